"""`lookahead bench`: data loaders, the method registry, summaries, and small end-to-end runs (a tiny random
Llama with the real tokenizer; the real SmolLM2-135M for the `slow` ones)."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import re
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from conftest import greedy_reference
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lookahead_decoding as ld
from lookahead_decoding.bench import (
    METHODS,
    count_forwards,
    hf_generate,
    load_file,
    load_hub,
    load_prompts,
    lookahead_with,
    main,
    register_method,
    summarize,
)
from lookahead_decoding.bench.cli import config_list, int_list
from lookahead_decoding.bench import profile as bench_profile
from lookahead_decoding.bench.profile import StepClock, time_captured_step, time_decoding
from lookahead_decoding.cli.common import CommandError
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.decoding import decode
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.bench.methods import parse_methods
from lookahead_decoding.cli.prompts_file import read_prompts
from lookahead_decoding.jsonl import JsonLinesError
from lookahead_decoding.sampling_params import SamplingParams
from lookahead_decoding.tuning import shape_name

torch.set_num_threads(1)

# Tiny files of our own in each upstream format: MT-Bench question.jsonl, HumanEval.jsonl.gz, GSM8K test.jsonl.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FILES = {"mtbench": "question.jsonl", "humaneval": "HumanEval.jsonl.gz", "gsm8k": "test.jsonl"}
SUMMARY_KEYS = {"n", "new_tokens", "seconds", "tokens_per_second", "tokens_per_step", "speedup_vs_greedy",
                "identical_to_greedy"}
ROW_KEYS = {"dataset", "prompt_index", "method", "new_tokens", "seconds", "steps", "identical_to_greedy"}


def write_jsonl(path: Path, lines: list[str], compress: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("dataset", sorted(FILES))
def test_upstream_format_files_load(dataset):
    prompts = load_prompts(dataset, FIXTURES / FILES[dataset], limit=3)
    assert [p.index for p in prompts] == [0, 1, 2]
    assert all(p.dataset == dataset and p.text.strip() for p in prompts)
    assert all(p.chat == (dataset != "humaneval") for p in prompts)


def test_upstream_format_file_contents():
    """The prompt is the first turn (MT-Bench), the prompt (HumanEval) or the question (GSM8K); other fields are
    ignored."""
    assert [p.text for p in load_file("mtbench", FIXTURES / FILES["mtbench"])] == [
        "Write a short note inviting a neighbour to a garden party on Saturday.",
        "A shelf holds 4 red books and twice as many blue books. How many books are on the shelf?",
        "Explain what a Python generator is, with a two-line example.",
    ]
    humaneval = load_file("humaneval", FIXTURES / FILES["humaneval"])
    assert len(humaneval) == 4
    assert humaneval[0].text == ('def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n'
                                 '    >>> add(2, 3)\n    5\n    """\n')
    gsm8k = load_file("gsm8k", FIXTURES / FILES["gsm8k"])
    assert gsm8k[0].text == ("Mia buys 3 packs of pencils with 12 pencils in each pack. She gives away 10 pencils. How "
                             "many pencils does she have left?")
    assert gsm8k[2].text.startswith("Tom\u2019s garden")  # upstream writes non-ASCII as \u escapes


def test_tiny_files_of_every_format(tmp_path):
    mt = write_jsonl(tmp_path / "question.jsonl", [
        json.dumps({"question_id": 1, "category": "writing", "turns": ["first turn", "second turn"]}),
        "",
        json.dumps({"question_id": 2, "category": "math", "turns": ["again"], "reference": ["x"]}),
    ])
    assert [p.text for p in load_file("mtbench", mt)] == ["first turn", "again"]
    he = write_jsonl(tmp_path / "HumanEval.jsonl.gz", [json.dumps({"task_id": "t/0", "prompt": "def f():\n"})], True)
    assert [(p.text, p.chat) for p in load_file("humaneval", he)] == [("def f():\n", False)]
    # Gzip is recognised by content, not by name.
    plain = write_jsonl(tmp_path / "humaneval.jsonl", [json.dumps({"prompt": "def g():\n"})])
    assert load_file("humaneval", plain)[0].text == "def g():\n"
    gsm = write_jsonl(tmp_path / "test.jsonl", [json.dumps({"question": f"q{i}", "answer": "#### 1"}) for i in range(5)])
    assert [p.text for p in load_file("gsm8k", gsm, limit=2)] == ["q0", "q1"]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(JsonLinesError) as info:
        load_file("gsm8k", missing)
    assert str(info.value) == f"{missing}: cannot read it (No such file or directory)"


@pytest.mark.parametrize(
    "dataset, bad_line, message",
    [
        ("gsm8k", "{not json", "3: not valid JSON"),
        ("gsm8k", json.dumps({"answer": "#### 3"}), "3: missing field 'question'"),
        ("gsm8k", json.dumps({"question": 7}), "3: field 'question' must be a non-empty string"),
        ("gsm8k", json.dumps(["question"]), "3: expected a JSON object"),
        ("mtbench", json.dumps({"question_id": 3}), "3: missing field 'turns'"),
        ("mtbench", json.dumps({"turns": "just text"}), "3: field 'turns' must be a list"),
        ("humaneval", json.dumps({"task_id": "x"}), "3: missing field 'prompt'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, dataset, bad_line, message):
    good = {"gsm8k": {"question": "q"}, "mtbench": {"turns": ["t"]}, "humaneval": {"prompt": "p"}}[dataset]
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(good), json.dumps(good), bad_line],
                       compress=dataset == "humaneval")
    with pytest.raises(ValueError) as info:
        load_file(dataset, path)
    assert str(info.value).startswith(f"{path}:{message}")


def test_limit_stops_before_a_later_bad_line_and_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps({"question": "q"}), "{broken"])
    assert len(load_file("gsm8k", path, limit=1)) == 1
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no prompts"):
        load_file("gsm8k", empty)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_file("squad", path)


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(200)))
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JsonLinesError, match=rf"^{path}:\d+: cannot decompress it as gzip \(Compressed file ended"):
        load_file("humaneval", path)


def test_own_prompts_come_from_a_file_of_prompt_lines(tmp_path, capsys):
    """The `prompts` dataset: a JSON Lines file of "prompt" strings (other fields ignored), each one user turn;
    it has no Hub source, and a line without a prompt names its file and line."""
    path = write_jsonl(tmp_path / "mine.jsonl", [json.dumps({"id": "a", "prompt": "Say hi."}),
                                                 json.dumps({"prompt": "Translate: chat"})])
    prompts = load_prompts("prompts", path)
    assert [(p.text, p.chat, p.index) for p in prompts] == [("Say hi.", True, 0), ("Translate: chat", True, 1)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), json.dumps({"question": "q"})])
    with pytest.raises(JsonLinesError, match=rf"^{bad}:2: missing field 'prompt'$"):
        load_file("prompts", bad)
    message = ("the 'prompts' dataset is a local file of your own: pass --data-file PATH (JSON Lines, a \"prompt\" "
               "string on each line)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_prompts("prompts")
    assert main(["--dataset", "prompts"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_the_prompts_of_other_kinds_serve_bench_and_generate():
    """The repository's prompts of other kinds load as the `prompts` dataset and as a `lookahead generate
    --prompts-file` file, kinds taking turns so that any six in a row are one of each."""
    path = Path(__file__).resolve().parent.parent / "prompts" / "other_kinds.jsonl"
    prompts = load_file("prompts", path)
    lines = read_prompts(str(path), 256, chat=True)
    assert [p.text for p in prompts] == [line.prompt for line in lines] and len(prompts) == 24
    kinds = [str(line.id).rsplit("-", 1)[0] for line in lines]
    assert len(set(kinds)) == 6 and all(len(set(kinds[i : i + 6])) == 6 for i in range(len(kinds) - 5))


def test_hub_without_datasets_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match="'datasets' package, which is not installed"):
        load_hub("gsm8k", limit=2)


def test_hub_names_splits_and_fields(monkeypatch):
    calls = []
    records = {"openai/gsm8k": [{"question": "q0"}, {"question": "q1"}],
               "openai/openai_humaneval": [{"prompt": "def f():"}],
               "HuggingFaceH4/mt_bench_prompts": [{"prompt": ["turn 1", "turn 2"]}, {"category": "x"}]}

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return records[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert [p.text for p in load_prompts("gsm8k", limit=2)] == ["q0", "q1"]
    assert [p.text for p in load_prompts("humaneval")] == ["def f():"]
    assert load_prompts("mtbench", limit=1)[0].text == "turn 1"
    assert calls == [("openai/gsm8k", "main", "test[:2]"), ("openai/openai_humaneval", None, "test"),
                     ("HuggingFaceH4/mt_bench_prompts", None, "train[:1]")]
    with pytest.raises(ValueError, match="record 1: missing field 'prompt'"):
        load_prompts("mtbench")


# ------------------------------------------------------------------------------------------------ command line


def test_cli_input_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "test.jsonl", [json.dumps({"question": "q"}), json.dumps({"q": 1})])
    cases = [
        (["--data-file", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--data-file", str(bad)], f"{bad}:2: missing field 'question'"),
        (["--data-file", str(bad), "--methods", "greedy,magic"], "unknown method(s) magic"),
        (["--data-file", str(bad), "--window", "0"], "window must be >= 1"),
        (["--data-file", str(bad), "--sweep-configs", "3:3:3"], "--sweep-configs needs --sweep"),
        (["--data-file", str(bad), "--sweep-window", "3"], "--sweep-window needs --sweep"),
        (["--data-file", str(bad), "--profile-steps", "5"], "--profile-steps needs --profile"),
        (["--data-file", str(bad), "--methods", "greedy,pld", "--window", "5"],
         "lookahead: error: --window sets how lookahead drafts, but --methods greedy,pld runs no lookahead method"),
        (["--data-file", str(bad), "--batch-size", "2", "--methods", "ar-graph", "--device-drafts", "--tree-nodes",
          "15"], "--tree-nodes, --device-drafts set how lookahead drafts, but --methods ar-graph runs no lookahead "
                 "method"),
    ]
    for extra, message in cases:
        assert main(["--dataset", "gsm8k", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    for extra, message in [(["--seed", "-1"], "argument --seed: must be a non-negative integer, got -1"),
                           (["--batch-size", "1,,2"], "expected comma-separated integers, got '1,,2'")]:
        assert main(["--dataset", "gsm8k", "--data-file", str(bad), *extra]) == 2  # argparse: usage, then the error
        assert message in capsys.readouterr().err


def test_cli_without_datasets_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["--dataset", "mtbench"]) == 2
    assert "'datasets' package" in capsys.readouterr().err


def test_list_arguments():
    assert int_list("3,5, 7") == [3, 5, 7]
    assert config_list("3:4:3, 7:5:7:9, 7:5:7:9:40") == [(3, 4, 3), (7, 5, 7, 9), (7, 5, 7, 9, 40)]
    for parse, text in ((int_list, "3,x"), (int_list, "3,,5"), (int_list, ""), (config_list, "3:4"),
                        (config_list, "1:2:3:4:5:6"), (config_list, "")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


# ------------------------------------------------------------------------------------------------ methods, summary


def test_registry_is_open():
    assert {"greedy", "pld", "hf-compiled", "ar-graph", "lookahead", "lookahead-eager"} <= set(METHODS)

    @register_method("test-echo")
    def echo(model, input_ids, max_new_tokens, args):
        return input_ids, 0

    try:
        assert parse_methods("greedy, test-echo") == ["greedy", "test-echo"]
    finally:
        del METHODS["test-echo"]
    with pytest.raises(ValueError, match="twice"):
        parse_methods("pld,pld")


def test_summary_figures():
    def row(method, index, new_tokens, seconds, steps, same=True):
        return {"dataset": "d", "prompt_index": index, "method": method, "new_tokens": new_tokens,
                "seconds": seconds, "steps": steps, "identical_to_greedy": same}

    rows = [row("greedy", 0, 10, 2.0, 9), row("fast", 0, 10, 1.0, 4),
            row("greedy", 1, 30, 2.0, 29), row("fast", 1, 30, 4.0, 10, same=False)]
    summary = summarize(rows)
    assert summary["greedy"] == {"n": 2, "new_tokens": 40, "seconds": 4.0, "tokens_per_second": 10.0,
                                 "tokens_per_step": 40 / 38, "speedup_vs_greedy": 1.0, "identical_to_greedy": 1.0}
    assert summary["fast"]["tokens_per_step"] == 40 / 14
    assert summary["fast"]["speedup_vs_greedy"] == pytest.approx(8.0 / 10.0)
    assert summary["fast"]["identical_to_greedy"] == 0.5


# ------------------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random Llama over the real SmolLM2 tokenizer: the whole pipeline in a few seconds."""
    gguf = ld.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return model, tokenizer


def test_forward_hook_counts_steps(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    sequences, steps = hf_generate(model, ids, 12)
    assert sequences.shape[1] - ids.shape[1] == 12 and steps == 11  # one forward per token after the prefill
    ld.generate(model, ids, 12)  # the first call calibrates the default shapes (forwards of its own)
    with count_forwards(model) as counter:
        out = ld.generate(model, ids, 12)
    assert counter.steps == out.stats.steps
    _, steps, extra = lookahead_with(ld.LookaheadConfig(3, 3, 3))(model, ids, 12, None)
    assert sum(extra["accepted_histogram"].values()) == steps


def check_result(result: dict, dataset: str, methods: list[str], n: int) -> None:
    assert set(result) >= {"environment", "config", "summary", "rows"}
    assert {"device", "device_name", "torch", "transformers", "dtype", "model", "python", "threads"} <= set(result["environment"])
    summary = result["summary"][dataset]
    assert list(summary) == methods
    assert len(result["rows"]) == n * len(methods)
    for method, entry in summary.items():
        assert set(entry) == SUMMARY_KEYS and entry["n"] == n
        rows = [row for row in result["rows"] if row["method"] == method]
        assert entry["new_tokens"] == sum(row["new_tokens"] for row in rows)
        assert entry["seconds"] == pytest.approx(sum(row["seconds"] for row in rows))
        assert entry["tokens_per_step"] == pytest.approx(entry["new_tokens"] / sum(row["steps"] for row in rows))
        assert entry["tokens_per_second"] == pytest.approx(entry["new_tokens"] / entry["seconds"])
        assert entry["identical_to_greedy"] == sum(row["identical_to_greedy"] for row in rows) / n
        greedy = summary["greedy"]
        assert entry["speedup_vs_greedy"] == pytest.approx(entry["tokens_per_second"] / greedy["tokens_per_second"])
    for row in result["rows"]:
        assert ROW_KEYS <= set(row) and row["dataset"] == dataset
        assert row["tokens_per_step"] == pytest.approx(row["new_tokens"] / row["steps"])
        if row["method"] == "greedy":
            assert row["steps"] == row["new_tokens"] - 1
    assert summary["greedy"]["speedup_vs_greedy"] == 1.0
    assert summary["greedy"]["identical_to_greedy"] == 1.0


def test_tiny_bench_end_to_end(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--dataset", "gsm8k", "--data-file", str(FIXTURES / FILES["gsm8k"]), "--limit", "2",
            "--max-new-tokens", "12", "--methods", "lookahead,pld", "--window", "3", "--ngram", "3", "--guesses", "3",
            "--out", str(out), "--plot", str(plot)]
    assert main(argv, model=model, tokenizer=tokenizer) == 0
    result = json.loads(out.read_text())
    check_result(result, "gsm8k", ["greedy", "lookahead", "pld"], 2)
    assert result["summary"]["gsm8k"]["lookahead"]["identical_to_greedy"] == 1.0
    assert result["config"]["lookahead_config"] == {"window": 3, "ngram": 3, "guesses": 3, "candidate_length": 2,
                                                    "tree_nodes": 6, "device_drafts": False}
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert result["config"]["sampling"] is None
    table = capsys.readouterr().out
    assert "| greedy | 2 | 24 |" in table and "| lookahead |" in table
    assert "| tokens/step | speedup vs greedy | identical to greedy |" in table and "sampling" not in table


def test_tiny_sweep(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["--dataset", "mtbench", "--data-file", str(FIXTURES / FILES["mtbench"]), "--limit", "1",
            "--max-new-tokens", "8", "--sweep", "--sweep-window", "2,3", "--sweep-ngram", "3",
            "--out", str(out), "--plot", str(plot)]
    assert main(argv, model=model, tokenizer=tokenizer) == 0
    result = json.loads(out.read_text())
    assert sorted((e["window"], e["ngram"], e["guesses"]) for e in result["sweep"]) == [(2, 3, 2), (3, 3, 3)]
    speedups = [e["speedup_vs_greedy"] for e in result["sweep"]]
    assert speedups == sorted(speedups, reverse=True)
    assert all(e["identical_to_greedy"] == 1.0 and set(e) >= SUMMARY_KEYS for e in result["sweep"])
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "| lookahead | 3 | 3 | 3 | 2 |" in capsys.readouterr().out


def test_warm_up_builds_every_engine_the_run_needs(tiny, monkeypatch):
    """Prompts in two engine buckets: both engines exist before the first timed run, none is built after."""
    model, _ = tiny
    from lookahead_decoding import runners

    monkeypatch.setattr(runners, "STATIC_ENGINE_DEVICES", ("cpu",))  # the engine buckets as on CUDA, sized for CPU
    monkeypatch.setattr(runners, "_engines", weakref.WeakKeyDictionary())
    built = []
    timed_runs = []
    real_static_step = runners.StaticStep

    def recording_static_step(model, config, max_length, **kwargs):
        built.append((max_length, len(timed_runs)))
        return real_static_step(model, config, max_length, **kwargs)

    monkeypatch.setattr(runners, "StaticStep", recording_static_step)
    from lookahead_decoding.bench.runner import Encoded, measure
    from lookahead_decoding.bench.data import Prompt

    inputs = [Encoded(Prompt("d", i, "x", False), torch.tensor([[5, 6, 7] * n])) for i, n in enumerate((2, 60, 3))]
    args = argparse.Namespace(max_new_tokens=12, compile=False)

    def counting(method):
        def run(model, input_ids, max_new_tokens, args):
            if max_new_tokens == args.max_new_tokens:
                timed_runs.append(input_ids.shape[1])
            return method(model, input_ids, max_new_tokens, args)
        return run

    measure(model, inputs, {"greedy": counting(METHODS["greedy"]), "ar-graph": counting(METHODS["ar-graph"])}, 12, args)
    assert sorted(length for length, _ in built) == [128, 256]  # 6 + 12 and 180 + 12 tokens, CPU buckets of 128
    assert all(runs_before == 0 for _, runs_before in built)
    assert len(timed_runs) == 6


def test_tiny_profile(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    out = tmp_path / "p.json"
    argv = ["--dataset", "humaneval", "--data-file", str(FIXTURES / FILES["humaneval"]), "--max-new-tokens", "24",
            "--profile", "--profile-steps", "4", "--window", "3", "--ngram", "3", "--guesses", "2", "--out", str(out)]
    assert main(argv, model=model, tokenizer=tokenizer) == 0
    result = json.loads(out.read_text())
    assert result["profile"]["dataset"] == "humaneval" and result["profile"]["prompt_index"] == 0
    entries = result["profile"]["methods"]
    assert list(entries) == ["ar-graph", "lookahead"]
    assert entries["ar-graph"]["step_tokens"] == 1 and entries["lookahead"]["step_tokens"] == 3 * 2 + 2 * 2
    for entry in entries.values():
        assert entry["profiled_steps"] == 4 and entry["timer"] == "cpu" and entry["kernels_per_step"] is None
        assert entry["microseconds_per_step"] == pytest.approx(sum(entry["by_kind"].values()))
        assert entry["by_kind"]["matmul (projections, MLP, LM head)"] > 0
        assert entry["by_kind"]["attention"] > 0
        assert entry["captured_step_ms"] > 0
        assert entry["wall_step_ms"] > 0
        assert entry["host_share"] == pytest.approx(1 - entry["captured_step_ms"] / entry["wall_step_ms"])
    assert result["profile"]["batch_size"] == 1
    table = capsys.readouterr().out
    assert "| captured step at those widths, back to back (ms) |" in table
    assert "| decoding step, wall (ms) |" in table
    assert "| attention widths decoding read: steps | 64: 23 | 64: " in table
    assert "| host share of the wall time |" in table and "batch 1)" in table
    assert "| tokens in the step | 1 | 10 |" in table and "| total cpu time (µs) |" in table


def test_tiny_profile_of_a_step_that_drafts_on_the_device(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "p.json"
    argv = ["--dataset", "humaneval", "--data-file", str(FIXTURES / FILES["humaneval"]), "--max-new-tokens", "24",
            "--profile", "--profile-steps", "4", "--device-drafts", "--candidate-length", "8", "--tree-nodes", "15",
            "--out", str(out)]
    # The replays that time the step decode no row: a step whose drafts are accepted must not run off the cache.
    assert main(argv, model=model, tokenizer=tokenizer) == 0
    entry = json.loads(out.read_text())["profile"]["methods"]["lookahead"]
    assert entry["device_drafts"] and entry["step_tokens"] == 16 and entry["captured_step_ms"] > 0


def test_isolated_runs_start_each_prompt_from_blank_device_tables(tiny):
    """--isolated: a prompt decodes the same steps whatever the engine's tables learned from the prompts before."""
    model, _ = tiny
    config = ld.LookaheadConfig(1, 2, 1, candidate_length=8, tree_nodes=15, device_drafts=True)
    generator = torch.Generator().manual_seed(3)
    prompt, other = (torch.randint(0, 500, (1, 12), generator=generator) for _ in range(2))
    steps = {}
    for isolated in (True, False):
        run = lookahead_with(config)
        args = argparse.Namespace(isolated=isolated)
        steps[isolated] = [run(model, ids, 40, args)[1] for ids in (prompt, other, prompt)]
    assert steps[True][0] == steps[True][2]
    assert steps[False][2] < steps[False][0]  # the second time, from what the first time taught the tables


def test_timed_runs_pipeline_as_the_library_does(tiny):
    """The bench's timing wrapper keeps what the runner can do: steps launched behind unread ones where it
    pipelines (on CUDA by default; here forced on the CPU), the same tokens, and the model's time counted."""
    from lookahead_decoding.bench.methods import TimedRunner

    model, _ = tiny
    config = ld.LookaheadConfig(1, 2, 1, candidate_length=8, tree_nodes=15, device_drafts=True)
    engine = StaticStep(model, [config], 96, pipeline=True)
    chained = []
    chain = engine.chain
    engine.chain = lambda *args: chained.append(1) or chain(*args)
    timed = TimedRunner(engine)
    prompt = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(4))
    (result,), stats, _ = decode(model, prompt.tolist(), 40, config, runner=timed)
    assert result.tokens == greedy_reference(model, prompt, 40)[0].tolist()
    assert len(chained) > stats.steps // 2 and timed.model_seconds > 0


def test_tiny_profile_of_a_batch(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    out = tmp_path / "p.json"
    argv = ["--dataset", "humaneval", "--data-file", str(FIXTURES / FILES["humaneval"]), "--max-new-tokens", "16",
            "--profile", "--profile-steps", "3", "--window", "3", "--ngram", "3", "--guesses", "2",
            "--batch-size", "3", "--out", str(out)]
    assert main(argv, model=model, tokenizer=tokenizer) == 0
    result = json.loads(out.read_text())
    assert result["profile"]["batch_size"] == 3
    for entry in result["profile"]["methods"].values():
        assert entry["profiled_steps"] == 3 and entry["wall_step_ms"] > 0 and entry["captured_step_ms"] > 0
    assert "step profile (eager, uncaptured, batch 3)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--profile --batch-size 9 needs 9 prompts, the dataset gave 4"):
        main([*argv[:-2], "--batch-size", "9"], model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("pipelined", [False, True])
def test_the_step_clock_times_every_step_pipelined_or_not(tiny, pipelined):
    """`--profile`'s wall time per step: pipelined steps (CUDA's default) are launched and read apart, and count."""
    model, _ = tiny
    clock = StepClock(StaticStep(model, AUTOREGRESSIVE, 32, pipeline=pipelined))
    _, stats, _ = decode(model, [[3, 1, 4, 1, 5]], 12, AUTOREGRESSIVE, runner=clock)
    assert clock.steps == stats.steps == 11 and clock.ms_per_step > 0


def test_the_captured_step_is_timed_at_the_widths_decoding_read(tiny, monkeypatch):
    """--profile's device-only step: while its rows are short, decoding reads a narrower width of the cache than
    the whole; the replays time each width decoding read and weight it by its steps (replaying the whole cache's
    width alone overstated the step, and the host's share came out negative)."""
    model, _ = tiny
    engine = StaticStep(model, AUTOREGRESSIVE, 40)
    prompt = list(range(3, 15))  # 12 tokens: 4 steps read 16 slots (the tests' narrowest width), 7 read 32
    _, widths = time_decoding(model, [prompt], 12, AUTOREGRESSIVE, engine)
    assert engine.widths == (16, 32, 41) and widths == {16: 4, 32: 7}
    clock, replayed, replayable = [0.0], [], engine.replayable

    def replay_taking_a_millisecond_a_slot(shape, entries=None, width=None):
        if shape is None:  # the prefill runs as it is
            return replayable(shape, entries, width)
        replayed.append(width)
        return lambda: clock.__setitem__(0, clock[0] + width / 1e3)

    monkeypatch.setattr(engine, "replayable", replay_taking_a_millisecond_a_slot)
    monkeypatch.setattr(bench_profile.time, "perf_counter", lambda: clock[0])
    milliseconds = time_captured_step(engine, [prompt], widths)
    assert sorted(set(replayed)) == [16, 32]
    assert milliseconds == pytest.approx((16 * 4 + 32 * 7) / 11)


def test_profile_errors(tiny, capsys):
    model, tokenizer = tiny
    base = ["--dataset", "humaneval", "--data-file", str(FIXTURES / FILES["humaneval"]), "--profile"]
    assert main([*base, "--plot", "x.png"]) == 2
    assert "--profile cannot be combined with --sweep or --plot" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the generation ended after 2 steps, before the profiled steps"):
        main([*base, "--max-new-tokens", "3"], model=model, tokenizer=tokenizer)
    with pytest.raises(CommandError, match=r"^--compile needs a CUDA device: it compiles the engine's CUDA-graph "
                       r"steps$"):
        main([*base, "--compile"], model=model, tokenizer=tokenizer)  # a loaded model's device decides
    capsys.readouterr()
    assert main([*base, "--compile", "--device", "cpu"]) == 2  # before the model loads
    assert capsys.readouterr().err == ("lookahead: error: --compile needs a CUDA device: it compiles the engine's "
                                       "CUDA-graph steps\n")


# ------------------------------------------------------------------------------------------------ sampling


SAMPLING_ARGS = ["--dataset", "gsm8k", "--data-file", str(FIXTURES / FILES["gsm8k"]), "--limit", "2",
                 "--max-new-tokens", "12", "--window", "3", "--ngram", "3", "--guesses", "3", "--temperature", "0.8"]


def test_methods_sample_with_the_prompts_seed(tiny):
    """The library's methods draw what plain sampling (ld.generate, W=1 N=2 G=0) draws with the seed; HF's draw from
    torch's RNG seeded with it, so the same seed gives an HF method the same tokens again."""
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    plain = ld.LookaheadConfig(window=1, ngram=2, guesses=0)
    expected = ld.generate(model, ids, 12, plain, do_sample=True, temperature=0.8, top_p=0.9, seed=5).sequences
    assert not torch.equal(expected, ld.generate(model, ids, 12, plain).sequences)
    args = argparse.Namespace(window=3, ngram=3, guesses=3, candidate_length=None, tree_nodes=None, max_new_tokens=12)
    for name in ("ar-graph", "lookahead", "lookahead-eager"):
        assert torch.equal(METHODS[name](model, ids, 12, args, sampling=sampling)[0], expected), name
    sampled = [METHODS[name](model, ids, 12, args, sampling=sampling)[0] for name in ("greedy", "greedy", "pld")]
    assert torch.equal(sampled[0], sampled[1]) and sampled[2].shape == sampled[0].shape
    assert not torch.equal(sampled[0], METHODS["greedy"](model, ids, 12, args)[0])


def test_tiny_bench_samples(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    out = tmp_path / "s.json"
    argv = [*SAMPLING_ARGS, "--top-p", "0.9", "--methods", "greedy,lookahead", "--out", str(out)]
    assert main(argv, model=model, tokenizer=tokenizer) == 0
    result = json.loads(out.read_text())
    assert result["config"]["reference"] == "ar-graph"  # HF generate cannot draw the library's samples
    assert result["config"]["sampling"] == {
        "temperature": 0.8, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "seed": 0, "prompt_seed": "seed + prompt_index",
        "exact_match": "same tokens as the reference (ar-graph) with the same seed"}
    summary = result["summary"]["gsm8k"]
    assert list(summary) == ["ar-graph", "hf-sample", "lookahead"]  # HF's greedy method, sampling
    # fp32, the same seed: lookahead commits ar-graph's tokens
    assert summary["lookahead"]["identical_to_greedy"] == 1.0
    assert [row["first_mismatch"] for row in result["rows"] if row["method"] == "lookahead"] == [None, None]
    table = capsys.readouterr().out
    assert "| tokens/step | speedup vs ar-graph | same tokens as ar-graph, same seed |" in table
    assert "sampling at temperature 0.8 (top-k off, top-p 0.9, min-p off), prompt i with seed 0 + i in every " \
           "method; HF methods (hf-sample: model.generate(do_sample=True))" in table
    assert "| hf-sample | 2 | 24 |" in table and "| ar-graph | 2 | 24 |" in table


def test_tiny_batched_bench_samples(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    out = tmp_path / "b.json"
    assert main([*BATCHED_ARGS, "--temperature", "0.8", "--top-k", "20", "--out", str(out)],
                model=model, tokenizer=tokenizer) == 0
    result = json.loads(out.read_text())
    assert result["config"]["sampling"]["top_k"] == 20 and result["config"]["sampling"]["temperature"] == 0.8
    # Every row, at every batch size, commits ar-graph's tokens with its prompt's seed.
    assert [(r["batch_size"], r["method"], r["identical"]) for r in result["batched"]] == [
        (1, "ar-graph", 4), (1, "lookahead", 4), (3, "ar-graph", 4), (3, "lookahead", 4)]
    table = capsys.readouterr().out
    assert "| forwards | same tokens as ar-graph, same seed | plan |" in table
    assert "4 prompts\n\nsampling at temperature 0.8 (top-k 20, top-p off, min-p off)" in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "test-greedy-only,lookahead"],
         "--temperature: test-greedy-only cannot sample (greedy only); methods that sample: greedy, pld, "
         "hf-compiled, ar-graph, lookahead, lookahead-eager"),
        (["--profile"], "--profile profiles greedy decoding steps: it cannot be combined with --temperature"),
        (["--top-p", "2"], "top_p must be a number in (0, 1] (1 disables it), got 2.0"),
        (["--temperature", "0", "--min-p", "0.1"], "--min-p shapes the sampled distribution: it needs --temperature > 0"),
    ],
    ids=["greedy-only-method", "profile", "top-p", "min-p-greedy"],
)
def test_sampling_input_errors_exit_2_before_any_work(tmp_path, capsys, extra, message):
    @register_method("test-greedy-only")
    def greedy_only(model, input_ids, max_new_tokens, args):
        return input_ids, 0

    # The data file is missing: every one of these errors comes first.
    argv = ["--dataset", "gsm8k", "--data-file", str(tmp_path / "missing.jsonl"), "--temperature", "0.8", *extra]
    try:
        assert main(argv) == 2
    finally:
        del METHODS["test-greedy-only"]
    assert capsys.readouterr().err == f"lookahead: error: {message}\n"


# ------------------------------------------------------------------------------------------------ batched mode


BATCHED_KEYS = {"dataset", "batch_size", "batch_rows", "method", "reference", "prompts", "new_tokens", "seconds",
                "throughput_tokens_per_s", "speedup", "tokens_per_step_per_row", "forwards", "steps_by_shape", "prefills",
                "carried_prompts", "identical", "different_prompts", "plan"}
BATCHED_ARGS = ["--dataset", "humaneval", "--data-file", str(FIXTURES / FILES["humaneval"]), "--limit", "4",
                "--max-new-tokens", "12", "--batch-size", "1,3", "--window", "3", "--ngram", "3", "--guesses", "3"]


@pytest.fixture(scope="module")
def batched_run(tiny, tmp_path_factory):
    """(result, printed table, plot path) of a batched run: ar-graph and lookahead at batch sizes 1 and 3."""
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("batched")
    out, plot = folder / "b.json", folder / "b.png"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*BATCHED_ARGS, "--out", str(out), "--plot", str(plot)], model=model, tokenizer=tokenizer) == 0
    return json.loads(out.read_text()), printed.getvalue(), plot


def test_batched_records(batched_run):
    result, _, _ = batched_run
    assert result["config"]["method_list"] == ["ar-graph", "lookahead"] and result["config"]["batch_size"] == [1, 3]
    records = result["batched"]
    assert [(r["batch_size"], r["batch_rows"], r["method"]) for r in records] == [
        (1, 1, "ar-graph"), (1, 1, "lookahead"), (3, 3, "ar-graph"), (3, 3, "lookahead")]
    for record in records:
        assert set(record) == BATCHED_KEYS and record["dataset"] == "humaneval" and record["reference"] == "ar-graph"
        rows = [row for row in result["rows"]
                if (row["batch_size"], row["method"]) == (record["batch_size"], record["method"])]
        assert [row["prompt_index"] for row in rows] == [0, 1, 2, 3] and record["prompts"] == 4
        assert record["new_tokens"] == sum(row["new_tokens"] for row in rows) == 4 * 12
        assert record["throughput_tokens_per_s"] == pytest.approx(record["new_tokens"] / record["seconds"])
        assert record["tokens_per_step_per_row"] == pytest.approx(sum(row["tokens_per_step"] for row in rows) / 4)
        # greedy, fp32: lookahead commits ar-graph's tokens, row by row
        assert record["identical"] == 4 and record["different_prompts"] == []
        assert all(row["identical_to_reference"] for row in rows)
        reference = next(r for r in records if (r["batch_size"], r["method"]) == (record["batch_size"], "ar-graph"))
        speedup = record["throughput_tokens_per_s"] / reference["throughput_tokens_per_s"]
        assert record["speedup"] == pytest.approx(speedup)
    plain_one, lookahead_one, plain_three, _ = records
    assert plain_one["forwards"] == 4 * 11  # one row: a forward per token after each prompt's prefill
    # Prefills apart: one row starts each prompt alone; three rows start three together, then the fourth.
    assert [record["prefills"] for record in records] == [4, 4, 2, 2]
    assert plain_three["forwards"] < plain_one["forwards"]  # three rows share each forward
    assert plain_one["plan"] == "plain (one shape)" and lookahead_one["plan"].startswith("lookahead W=3 N=3 G=3")
    assert plain_three["steps_by_shape"] == {"plain": plain_three["forwards"]}
    assert lookahead_one["steps_by_shape"] == {shape_name(ld.LookaheadConfig(3, 3, 3)): lookahead_one["forwards"]}


def test_batched_table_and_plot(batched_run):
    _, table, plot = batched_run
    assert "### humaneval: batched, 4 prompts" in table
    assert "| batch size | method | tokens/s | speedup vs ar-graph | tokens/step per row | forwards | identical to " \
           "ar-graph | plan |" in table
    assert "| 1 | ar-graph |" in table and "| 1.00x | 1.09 | 44 | 4/4 | plain (one shape) |" in table
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_plot_script_draws_a_line_per_dataset(batched_run, tmp_path):
    result, _, _ = batched_run
    runs = []
    for dataset in ("humaneval", "mtbench"):
        path = tmp_path / f"{dataset}.json"
        path.write_text(json.dumps({**result, "batched": [{**r, "dataset": dataset} for r in result["batched"]]}))
        runs.append(str(path))
    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_batch_speedups.py"
    out = tmp_path / "all.png"
    done = subprocess.run([sys.executable, str(script), str(out), *runs], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "plain.json").write_text(json.dumps({"summary": {}}))
    done = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "plain.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.endswith(f"error: {tmp_path / 'plain.json'}: not a batched bench result (no 'batched' "
                                "records); run lookahead bench with --batch-size\n")


def test_batched_warm_up_builds_the_engines_before_timing(tiny, monkeypatch):
    """Engines as on CUDA (cached static engines): each (method, batch size) builds its engine in the warm-up, and
    no timed call builds one."""
    model, tokenizer = tiny
    from lookahead_decoding import runners
    from lookahead_decoding.bench import batched

    monkeypatch.setattr(runners, "STATIC_ENGINE_DEVICES", ("cpu",))
    monkeypatch.setattr(runners, "_engines", weakref.WeakKeyDictionary())
    built, built_while_timed = [], []
    real_static_step, real_stopwatch = runners.StaticStep, batched.stopwatch

    def recording_static_step(model, shapes, max_length, **kwargs):
        built.append(kwargs["batch_size"])
        return real_static_step(model, shapes, max_length, **kwargs)

    def checking_stopwatch(device, call):
        before = len(built)
        timed = real_stopwatch(device, call)
        built_while_timed.append(len(built) - before)
        return timed

    monkeypatch.setattr(runners, "StaticStep", recording_static_step)
    monkeypatch.setattr(batched, "stopwatch", checking_stopwatch)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*BATCHED_ARGS, "--limit", "3"], model=model, tokenizer=tokenizer) == 0
    assert built == [1, 1, 3, 3] and built_while_timed == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "2", "--methods", "greedy,pld,lookahead"],
         "lookahead: error: --batch-size: greedy, pld cannot run batched (one prompt at a time); batched methods: "
         "ar-graph, lookahead"),
        (["--batch-size", "2", "--reference", "greedy"],
         "lookahead: error: --batch-size: greedy cannot run batched (one prompt at a time); batched methods: "
         "ar-graph, lookahead"),
        (["--batch-size", "2", "--sweep"], "lookahead: error: --batch-size cannot be combined with --sweep"),
        (["--batch-size", "2,4", "--profile"], "lookahead: error: --profile takes one --batch-size, got 2,4"),
        (["--batch-size", "0"], "lookahead bench: error: argument --batch-size: batch sizes must be positive integers, "
         "got 0"),
        (["--batch-size", "8,-1"], "lookahead bench: error: argument --batch-size: batch sizes must be positive "
         "integers, got -1"),
        (["--batch-size", "a"], "lookahead bench: error: argument --batch-size: expected comma-separated integers, "
         "got 'a'"),
        (["--batch-size", ""], "lookahead bench: error: argument --batch-size: expected comma-separated integers, "
                               "got ''"),
        (["--batch-size", "8,8"], "lookahead bench: error: argument --batch-size: a batch size is repeated in '8,8'"),
    ],
    ids=["hf-methods", "hf-reference", "sweep", "profile-two", "zero", "negative", "letter", "empty", "repeated"],
)
def test_batched_input_errors_exit_2_before_any_work(tmp_path, capsys, extra, message):
    # The data file is missing: every one of these errors comes first.
    argv = ["--dataset", "gsm8k", "--data-file", str(tmp_path / "missing.jsonl"), *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == message


# ------------------------------------------------------------------------------------------------ output paths


@pytest.mark.parametrize(
    "option, path, message",
    [
        ("--out", "{tmp}", "--out {tmp}: is a folder, not a file"),
        ("--out", "{tmp}/missing/r.json", "--out {tmp}/missing/r.json: the folder {tmp}/missing does not exist"),
        ("--plot", "{tmp}/missing/r.png", "--plot {tmp}/missing/r.png: the folder {tmp}/missing does not exist"),
        ("--plot", "{tmp}/r.txt", "--plot {tmp}/r.txt: unknown image format 'txt'; use one of "),
        ("--out", "/sys/r.json", "--out /sys/r.json: cannot write there (Permission denied)"),
    ],
    ids=["folder", "missing-folder", "plot-missing-folder", "plot-format", "read-only"],
)
def test_unwritable_output_is_rejected_before_any_work(tmp_path, capsys, option, path, message):
    if path.startswith("/sys") and not os.path.isdir("/sys"):
        pytest.skip("needs Linux's sysfs, which refuses new files even to root")
    # The data file is missing too: the output path is checked first, before the data is read.
    argv = ["--dataset", "gsm8k", "--data-file", str(tmp_path / "missing.jsonl"), option, path.format(tmp=tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lookahead: error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the probe left nothing behind


def test_output_that_fails_at_the_end_goes_to_stdout(tiny, tmp_path, capsys):
    """The output folder disappears during the run: the results come out on stdout instead of being lost."""
    model, tokenizer = tiny
    folder = tmp_path / "results"
    folder.mkdir()

    @register_method("test-remove-folder")
    def remove_folder(model, input_ids, max_new_tokens, args):
        if folder.exists():
            folder.rmdir()
        return hf_generate(model, input_ids, max_new_tokens)

    argv = ["--dataset", "gsm8k", "--data-file", str(FIXTURES / FILES["gsm8k"]), "--limit", "1",
            "--max-new-tokens", "4", "--methods", "test-remove-folder",
            "--out", str(folder / "r.json"), "--plot", str(folder / "r.png")]
    try:
        assert main(argv, model=model, tokenizer=tokenizer) == 1
    finally:
        del METHODS["test-remove-folder"]
    captured = capsys.readouterr()
    # The rest of stderr is tqdm's progress bars.
    assert [line for line in captured.err.splitlines() if line.startswith("lookahead:")] == [
        f"lookahead: error: could not write --out {folder / 'r.json'} (No such file or directory)",
        f"lookahead: error: could not write --plot {folder / 'r.png'} (No such file or directory)",
    ]
    table, _, document = captured.out.partition("\nresults (JSON):\n")
    assert "| greedy | 1 | 4 |" in table
    result = json.loads(document)
    assert list(result["summary"]["gsm8k"]) == ["greedy", "test-remove-folder"]


def test_chat_dataset_on_a_model_without_chat_template(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(tokenizer, "chat_template", None)
    argv = ["--dataset", "gsm8k", "--data-file", str(FIXTURES / FILES["gsm8k"]), "--limit", "1"]
    with pytest.raises(ValueError, match=r"^the gsm8k prompts are chat turns and need a chat template, but this "
                       r"model's tokenizer has none; use a chat model, or a dataset of plain-text prompts \(humaneval\)$"):
        main(argv, model=model, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def smollm():
    return ld.load_default_model("cpu", torch.float32)


@pytest.mark.slow
def test_real_model_bench(smollm, tmp_path):
    model, tokenizer = smollm
    out = tmp_path / "tmp.json"
    argv = ["--dataset", "humaneval", "--data-file", str(FIXTURES / FILES["humaneval"]), "--limit", "2",
            "--max-new-tokens", "16", "--methods", "greedy,pld,ar-graph,lookahead", "--out", str(out)]
    assert main(argv, model=model, tokenizer=tokenizer) == 0
    result = json.loads(out.read_text())
    check_result(result, "humaneval", ["greedy", "pld", "ar-graph", "lookahead"], 2)
    summary = result["summary"]["humaneval"]
    assert summary["ar-graph"]["identical_to_greedy"] == 1.0  # fp32: the static engine, run eagerly on CPU
    assert summary["lookahead"]["identical_to_greedy"] == 1.0
    assert summary["ar-graph"]["tokens_per_step"] == pytest.approx(16 / 15)  # one token per step after the prefill
    assert result["environment"]["dtype"] == "float32"
    lookahead_rows = [row for row in result["rows"] if row["method"] == "lookahead"]
    assert all(sum(row["accepted_histogram"].values()) == row["steps"] for row in lookahead_rows)


def test_replay_script_counts_the_steps_of_a_fixed_plan(cli_model):
    script = Path(__file__).resolve().parents[1] / "scripts" / "replay_plan.py"
    data = Path(__file__).parent / "fixtures" / "HumanEval.jsonl.gz"
    run = [sys.executable, str(script), "--model", cli_model, "--data-file", str(data), "--limit", "3",
           "--max-new-tokens", "12", "--batch-size", "2", "--threads", "1"]
    done = subprocess.run([*run, "--shapes", "plain:1,3:4:3:4:6:1.5", "--prefill-ms", "2"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    steps = result["batched_steps_by_shape"]
    assert result["plan"] == "plain 1.00 ms, lookahead W=3 N=4 G=3 K=4 B=6 1.50 ms"
    assert result["prefills"] == 2  # two rows start together, the third prompt later
    assert result["carried_prompts"] == 0  # (only steps that draft on the device carry prompts)
    assert result["projected_device_ms"] == steps.get("plain", 0) * 1.0 \
        + steps.get("lookahead W=3 N=4 G=3 K=4 B=6", 0) * 1.5 + 2 * 2.0
    for bad in ("-1", "nan", "inf"):
        done = subprocess.run([*run, "--shapes", "plain:1", "--prefill-ms", bad], capture_output=True, text=True)
        assert done.returncode == 2
        assert done.stderr.endswith(f"--prefill-ms must be a finite number >= 0, got {float(bad)}\n")
    assert 0 < result["tokens"] <= 36 and result["tokens_per_step_per_row"] >= 1
    done = subprocess.run([*run, "--shapes", "plain:1,3:4:3:1.5"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.endswith("argument --shapes: '3:4:3:1.5' is none of plain:MS, W:N:G:K:B:MS and device:B:K:MS "
                                "with a cost MS > 0\n")
    done = subprocess.run([*run, "--shapes", "plain:1,device:6:3:1.5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plan"] == "plain 1.00 ms, device drafts B=6 K=3 1.50 ms"
