"""DraftMemory: bounded (the oldest requests evicted), one model only, never changes the output, and drafts a
repeated request's text so that it decodes in fewer steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, greedy_reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lookahead_decoding as ld
from lookahead_decoding.bench.memory import FILES
from lookahead_decoding.bench.memory import main as bench_memory
from lookahead_decoding.cli import main
from lookahead_decoding.decoding import open_scheduler
from lookahead_decoding.drafting.memory import BLOCKS, MAX_MATCH, MemorySource
from lookahead_decoding.scheduler import Request

CONFIG = ld.LookaheadConfig(window=3, ngram=3, guesses=2, candidate_length=8)  # one fixed shape: no calibration
EXACTNESS_ARCHITECTURES = ["llama", "gpt2", "qwen3", "mistral"]  # mistral: a sliding window the output crosses
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def live_texts(texts, max_requests, max_tokens):
    """The texts a memory holds after adding `texts`: the newest ones within both bounds, each cut to its last
    max_tokens tokens."""
    if max_tokens is not None:
        texts = [text[-max_tokens:] for text in texts]
    kept, tokens = [], 0
    for text in reversed([text for text in texts if text]):
        if len(kept) == max_requests or (max_tokens is not None and tokens + len(text) > max_tokens):
            break
        kept.insert(0, text)
        tokens += len(text)
    return kept


def brute_force_find(texts, history, max_length, limit):
    """The longest suffix of `history` (at most MAX_MATCH) that occurs inside one of `texts` with a token after
    it, and what followed its occurrences, newest text first and latest occurrence first."""
    for k in range(min(MAX_MATCH, len(history)), 0, -1):
        found = [text[end + 1: end + 1 + max_length]
                 for text in reversed(texts)
                 for end in range(len(text) - 2, k - 2, -1) if text[end - k + 1: end + 1] == history[-k:]]
        if found:
            return k, found[:limit]
    return 0, []


def filled(texts, **bounds) -> ld.DraftMemory:
    memory = ld.DraftMemory(**bounds)
    for text in texts:
        memory.add(text)
    return memory


# ------------------------------------------------------------------------------------------------ the store


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.lists(st.integers(0, 3), max_size=12), max_size=14), max_requests=st.integers(1, 6),
       max_tokens=st.one_of(st.none(), st.integers(1, 40)), history=st.lists(st.integers(0, 3), min_size=1,
                                                                            max_size=8),
       max_length=st.integers(1, 5), limit=st.integers(1, 30))
def test_lookups_see_exactly_the_newest_requests_within_the_bounds(texts, max_requests, max_tokens, history,
                                                                   max_length, limit):
    memory = filled(texts, max_requests=max_requests, max_tokens=max_tokens)
    live = live_texts(texts, max_requests, max_tokens)
    assert len(memory) == len(live) and memory.tokens == sum(map(len, live))
    assert memory.find(history, max_length, limit) == brute_force_find(live, history, max_length, limit)
    # Evicted text stays indexed only until its block goes: at most one block beyond what is held.
    block = -(-max_requests // BLOCKS)
    assert memory.indexed_tokens <= memory.tokens + block * max(map(len, texts), default=0)


def test_the_oldest_request_is_evicted_first_and_its_block_dropped():
    memory = ld.DraftMemory(max_requests=8)  # blocks of 2 requests
    texts = [[10 * i + j for j in range(1, 6)] for i in range(20)]
    for count, text in enumerate(texts, start=1):
        memory.add(text)
        assert len(memory) == min(count, 8)
    assert memory.find([41, 42], 3, 10) == (0, [])  # request 4 is gone
    assert memory.find([191, 192], 3, 10) == (2, [[193, 194, 195]])  # request 19 is held
    assert memory.find([121, 122], 3, 10) == (2, [[123, 124, 125]])  # so is request 12, the oldest held
    assert memory.indexed_tokens == 8 * 5  # requests 12..19, in four whole blocks


def test_token_bound_and_long_texts():
    memory = filled([[1, 2, 3, 4], [5, 6, 7], [8, 9, 1, 2, 5, 5]], max_requests=10, max_tokens=6)
    assert (len(memory), memory.tokens) == (1, 6)
    assert memory.find([1, 2], 4, 10) == (2, [[5, 5]])  # not [3, 4]: that request was evicted
    memory.add(list(range(20, 40)))  # longer than max_tokens: its last 6 tokens are kept
    assert (len(memory), memory.tokens) == (1, 6)
    assert memory.find([34, 35], 4, 10) == (2, [[36, 37, 38, 39]])
    assert memory.find([20, 21], 4, 10) == (0, [])


@pytest.mark.parametrize("bounds, error, message", [
    ({"max_requests": 0}, ValueError, "max_requests must be a positive integer, got 0"),
    ({"max_requests": 2.5}, TypeError, "max_requests must be a positive integer, got 2.5"),
    ({"max_requests": True}, TypeError, "max_requests must be a positive integer, got True"),
    ({"max_tokens": -3}, ValueError, "max_tokens must be a positive integer, got -3"),
    ({"max_tokens": "100"}, TypeError, "max_tokens must be a positive integer or None, got '100'"),
])
def test_bad_bounds_are_refused(bounds, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        ld.DraftMemory(**bounds)


def test_memory_source_drafts_what_followed_the_match_in_earlier_requests():
    memory = filled([[1, 2, 3, 4, 5], [9, 2, 3, 4, 6], [7, 7, 2, 3, 4, 5]])
    source = MemorySource(memory)
    # "2 3 4" was followed by 5 twice and by 6 once; a 3-token match has confidence 3/4.
    assert source.propose([8, 2, 3, 4], 4, 10) == [((5,), (pytest.approx(2 / 3 * 3 / 4),), ("memory", 3)),
                                                   ((6,), (pytest.approx(1 / 3 * 3 / 4),), ("memory", 3))]
    assert source.propose([8, 8, 8, 3], 4, 10) == []  # a 1-token match is below min_match


# ------------------------------------------------------------------------------------------------ one model


def test_a_memory_never_crosses_models():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    memory = ld.DraftMemory(max_requests=4)
    ld.generate(llama, [[1, 2, 3]], 4, CONFIG, memory=memory)
    message = (r"^this DraftMemory holds the text of model '\(unnamed\)' \(llama, vocabulary 96\) and cannot draft "
               r"for model '\(unnamed\)' \(gpt2, vocabulary 96\): a memory never crosses models or tokenizers; use "
               r"one DraftMemory per model$")
    with pytest.raises(ValueError, match=message):
        ld.generate(gpt2, [[1, 2, 3]], 4, CONFIG, memory=memory)
    with pytest.raises(ValueError, match=message):
        open_scheduler(gpt2, 1, 32, CONFIG, memory=memory)
    assert len(memory) == 1  # the refused calls added nothing
    ld.generate(tiny_model("llama"), [[4, 5, 6]], 4, CONFIG, memory=memory)  # the same model again is fine


def test_memory_must_be_a_draft_memory(llama):
    with pytest.raises(TypeError, match="^memory must be a DraftMemory or None, got int$"):
        ld.generate(llama, [[1, 2, 3]], 4, CONFIG, memory=256)


def test_an_isolated_call_takes_no_memory(llama):
    message = (r"^isolated=True decodes apart from every other request, so it takes no memory: pass memory=None, or "
               r"isolated=False to draft from the memory$")
    with pytest.raises(ValueError, match=message):
        ld.generate(llama, [[1, 2, 3]], 4, CONFIG, memory=ld.DraftMemory(), isolated=True)
    with pytest.raises(TypeError, match="^isolated must be True or False, got 'yes'$"):
        ld.generate(llama, [[1, 2, 3]], 4, CONFIG, isolated="yes")


# ------------------------------------------------------------------------------------------------ exactness


@st.composite
def histories(draw, max_size=24):
    if draw(st.booleans()):
        return draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=max_size))
    motif = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4))
    return (motif * max_size)[: draw(st.integers(1, max_size))]


def poisoned(text: list[int], keep: int, shift: int) -> list[int]:
    """`text` with every token after the first `keep` changed: continuations that look right and are wrong."""
    return text[:keep] + [(token + shift) % VOCAB for token in text[keep:]]


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(EXACTNESS_ARCHITECTURES), prompt=histories(), earlier=st.lists(histories(48), max_size=4),
       shift=st.integers(1, VOCAB - 1), max_new_tokens=st.integers(1, 32),
       source=st.sampled_from([None, "suffix", ("pool", "recycled")]))
def test_output_equals_greedy_with_a_memory_of_right_and_wrong_continuations(arch, prompt, earlier, shift,
                                                                             max_new_tokens, source):
    model = tiny_model(arch)
    expected = greedy_reference(model, torch.tensor([prompt]), max_new_tokens)[0].tolist()
    memory = ld.DraftMemory(max_requests=8)
    # Other texts, the true one, and the true one poisoned: the memory proposes right and wrong drafts.
    held = [*earlier, expected, poisoned(expected, len(prompt), shift), prompt + [shift] * 8]
    for text in held:
        memory.add(text)
    memory.bind(model)
    out = ld.generate(model, [prompt], max_new_tokens, CONFIG, source=source, memory=memory)
    assert out.sequences[0].tolist() == expected
    assert len(memory) == len(held) + 1  # the call's text was added as it finished


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_memory_full_of_wrong_continuations_changes_nothing(arch):
    model = tiny_model(arch)
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    expected = greedy_reference(model, prompt, 40)
    memory = ld.DraftMemory(max_requests=16)
    for shift in [1] * 10 + [2] * 6:  # every request held continues the prompt wrongly, most of them alike
        memory.add(poisoned(expected[0].tolist(), 10, shift))
    memory.bind(model)
    drafts = MemorySource(memory).propose(prompt[0].tolist(), 8, 40)
    assert drafts[0].tokens == tuple(poisoned(expected[0].tolist(), 10, 1)[10:18])  # it proposes, wrongly
    out = ld.generate(model, prompt, 40, CONFIG, memory=memory)
    assert out.sequences.tolist() == expected.tolist()
    # A batch sharing the memory, sampled: the same tokens as without it.
    prompts = [prompt[0].tolist(), prompt[0, :6].tolist(), [3, 1, 4]]
    sampled = dict(do_sample=True, temperature=0.8, seed=5, batch_size=2)
    assert (ld.generate(model, prompts, 24, CONFIG, memory=memory, **sampled).sequences.tolist()
            == ld.generate(model, prompts, 24, CONFIG, **sampled).sequences.tolist())


# ------------------------------------------------------------------------------------------------ it helps


def test_a_repeated_prompt_decodes_in_fewer_steps_with_the_memory(llama):
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    without = [ld.generate(llama, prompt, 60, CONFIG).stats.steps for _ in range(2)]
    memory = ld.DraftMemory(max_requests=4)
    first, again = (ld.generate(llama, prompt, 60, CONFIG, memory=memory) for _ in range(2))
    assert without[0] == without[1] == first.stats.steps  # nothing outlives a call without a memory
    assert again.stats.steps < first.stats.steps / 2
    assert again.sequences.tolist() == first.sequences.tolist()
    assert memory.recycled  # the model's predictions are kept for later calls too


def test_scheduler_learns_finished_requests_except_isolated_ones(llama):
    memory = ld.DraftMemory(max_requests=4)
    scheduler = open_scheduler(llama, 2, 64, CONFIG, memory=memory)
    prompt = [5, 6, 7, 8, 9, 10]
    scheduler.submit(Request(prompt, 30, tag="shared"))
    scheduler.submit(Request([1, 2, 3], 10, tag="isolated", use_memory=False))
    first = {finished.tag: finished for finished in scheduler.run()}
    assert len(memory) == 1 and memory.tokens == len(first["shared"].tokens)
    scheduler.submit(Request(prompt, 30, tag="again"))
    again, = scheduler.run()
    assert again.tokens == first["shared"].tokens
    assert again.stats.steps < first["shared"].stats.steps


def test_prompts_file_drafts_from_earlier_prompts_by_default(cli_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": "def add(a, b):\n    return"}) + "\n" for i in (1, 2)))
    runs = {}
    for name, options in (("default", []), ("off", ["--draft-memory", "0"])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--prompts-file", str(prompts), "--out", str(out), "--model", cli_model,
                     "--max-new-tokens", "24", "--window", "3", "--ngram", "3", "--candidate-length", "8",
                     *options]) == 0
        runs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    capsys.readouterr()
    assert [r["text"] for r in runs["default"]] == [r["text"] for r in runs["off"]]
    assert runs["default"][0]["tokens_per_step"] == runs["off"][0]["tokens_per_step"]  # nothing earlier yet
    assert runs["default"][1]["tokens_per_step"] > 2 * runs["off"][1]["tokens_per_step"]


def test_prompts_file_without_a_memory_decodes_each_prompt_as_if_alone(cli_model, tmp_path, capsys):
    """--draft-memory 0 isolates the prompts: with drafting on the device too, where the engine's tables of the
    model's predictions would otherwise carry what one prompt taught them to the next."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": "def add(a, b):\n    return"}) + "\n" for i in (1, 2)))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), "--out", str(out), "--model", cli_model,
                 "--max-new-tokens", "24", "--device-drafts", "--candidate-length", "6", "--tree-nodes", "15",
                 "--draft-memory", "0"]) == 0
    capsys.readouterr()
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["text"] == second["text"] and first["tokens_per_step"] == second["tokens_per_step"]


@pytest.mark.parametrize("argv, message", [
    (["a prompt", "--draft-memory", "8"],
     "lookahead: error: --draft-memory goes with --prompts-file; a single prompt has no earlier prompts to draft "
     "from\n"),
    (["--prompts-file", "p.jsonl", "--out", "o.jsonl", "--draft-memory", "-1"],
     "lookahead generate: error: argument --draft-memory: must be a non-negative integer, got -1\n"),
])
def test_draft_memory_option_errors(capsys, argv, message):
    assert main(["generate", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith(message)


# ------------------------------------------------------------------------------------------------ the benchmark


def test_memory_benchmark_smoke_run(cli_model, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in FILES.values():
        (data / name).write_bytes((FIXTURES / name).read_bytes())
    out, plot = tmp_path / "memory.json", tmp_path / "memory.png"
    assert bench_memory(["--data-dir", str(data), "--model", cli_model, "--limit", "2", "--max-new-tokens", "6",
                         "--window", "3", "--ngram", "3", "--out", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    assert [(r["phase"], r["item"]) for r in result["requests"]] == [
        ("humaneval", 0), ("humaneval", 1), ("mtbench-turn-1", 0), ("mtbench-turn-1", 1), ("mtbench-turn-2", 0),
        ("mtbench-turn-2", 1)]
    turn_2, turn_1 = result["requests"][4], result["requests"][2]
    assert turn_2["on"]["prompt_tokens"] > turn_1["on"]["prompt_tokens"] + turn_1["on"]["new_tokens"]  # the chat
    overall = result["summary"]["all"]
    assert (overall["n"], overall["identical"]) == (6, 6)
    assert overall["tokens_per_step_ratio"] == overall["on"]["tokens_per_step"] / overall["off"]["tokens_per_step"]
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "| all | 6 |" in capsys.readouterr().out
