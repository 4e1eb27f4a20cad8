"""Batched lookahead decoding: every row of a batch (continuous batching included) equals its own greedy decode,
rows stop on their own, and the scheduler admits and retires requests row by row."""

import functools
import gc
import random
import sys

import numpy
import pytest
import torch
import transformers
from conftest import VOCAB, greedy_reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lookahead_decoding as ld
from lookahead_decoding import runners
from lookahead_decoding import scheduler as scheduler_module
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.device_drafts import TemplateShape, template_tree
from lookahead_decoding.drafting.tree import EMPTY_TREE
from lookahead_decoding.drafting.sources import make_source
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.model_adapter import UnsupportedModelError
from lookahead_decoding.scheduler import BatchScheduler, Request
from lookahead_decoding.step import PlannedStep, TokenRows
from lookahead_decoding.tuning import StepPlan, shape_name, verify_only

FIXED = {
    "small": ld.LookaheadConfig(2, 3, 2),
    "wide": ld.LookaheadConfig(4, 4, 3),
    "verify": verify_only(6, 3),
    "device": ld.LookaheadConfig(1, 2, 1, candidate_length=3, tree_nodes=8, device_drafts=True),
    "device window": ld.LookaheadConfig(3, 3, 2, candidate_length=3, tree_nodes=10, device_drafts=True),
}
MIXED = (AUTOREGRESSIVE, verify_only(4, 2), ld.LookaheadConfig(3, 3, 2), ld.LookaheadConfig(2, 2, 3, candidate_length=2),
         ld.LookaheadConfig(1, 2, 1, candidate_length=2, tree_nodes=6, device_drafts=True),
         ld.LookaheadConfig(2, 2, 2, candidate_length=2, tree_nodes=8, device_drafts=True))


def reference_tokens(model, prompt, max_new_tokens, **kwargs) -> list[int]:
    """HF greedy decoding of one prompt alone: prompt + new tokens."""
    ids = torch.tensor([prompt])
    return greedy_reference(model, ids, max_new_tokens, attention_mask=torch.ones_like(ids), **kwargs)[0].tolist()


def shuffled_shapes(seed: int, count: int):
    """Replaces `best_shape`: any shape of the plan, at random, every time a shape is chosen."""
    rng = random.Random(seed)
    return lambda *args, **kwargs: rng.randrange(count)


def expected_sequences(prompts, rows, pad):
    longest = max(map(len, prompts))
    new = [row.tokens[len(prompt):] for prompt, row in zip(prompts, rows)]
    width = max(map(len, new))
    return [[pad] * (longest - len(p)) + p + n + [pad] * (width - len(n)) for p, n in zip(prompts, new)]


def recorded_chains(runner: StaticStep) -> list[dict]:
    """The changes handed to every `chain` of `runner` from now on (one entry per chained step)."""
    calls, chain = [], runner.chain

    def recording(previous, changes):
        calls.append(dict(changes))
        return chain(previous, changes)

    runner.chain = recording
    return calls


def counted_forwards(runner: StaticStep) -> list[int]:
    """The batch size of every forward `runner` runs from now on."""
    batches, forward = [], runner.adapter.forward

    def counting(ids, *args, **kwargs):
        batches.append(ids.shape[0])
        return forward(ids, *args, **kwargs)

    runner.adapter.forward = counting
    return batches


prompt_strategy = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),
    st.builds(lambda motif, length: (motif * 30)[:length],
              st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4), st.integers(1, 30)),
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    arch=st.sampled_from(["llama", "qwen3", "gpt2", "gpt_neox", "phi3"]),
    prompts=st.lists(prompt_strategy, min_size=1, max_size=6),
    data=st.data(),
    plan_name=st.sampled_from([*FIXED, "mixed"]),
    max_new_tokens=st.integers(1, 30),
    eos_position=st.one_of(st.none(), st.integers(0, 29)),
    schedule_seed=st.integers(0, 10**6),
    pipelined=st.booleans(),
)
def test_every_row_of_a_batch_equals_its_own_greedy_decode(arch, prompts, data, plan_name, max_new_tokens,
                                                         eos_position, schedule_seed, pipelined):
    """Pipelined: plain steps and steps that draft on the device launched behind unread ones (on CUDA by
    default), here on the CPU's batch engine."""
    model = tiny_model(arch)
    batch_size = data.draw(st.integers(1, len(prompts)), label="batch_size")
    eos = None
    if eos_position is not None:  # a token some row really generates, so that rows stop at different steps
        first = reference_tokens(model, prompts[0], max_new_tokens)[len(prompts[0]):]
        eos = first[min(eos_position, len(first) - 1)]
    expected = [reference_tokens(model, prompt, max_new_tokens, eos_token_id=eos) for prompt in prompts]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runners, "StaticStep", functools.partial(StaticStep, pipeline=pipelined))
        if plan_name == "mixed":
            config = StepPlan(MIXED, (1.0,) * len(MIXED))
            patch.setattr(scheduler_module, "best_shape", shuffled_shapes(schedule_seed, len(MIXED)))
        else:
            config = FIXED[plan_name]
        out = ld.generate(model, prompts, max_new_tokens, config, eos_token_id=eos, batch_size=batch_size)
    assert [row.tokens for row in out.rows] == expected
    assert out.stats.new_tokens == sum(len(e) - len(p) for e, p in zip(expected, prompts))
    assert [row.stats.new_tokens for row in out.rows] == [len(e) - len(p) for e, p in zip(expected, prompts)]
    assert out.sequences.tolist() == expected_sequences(prompts, out.rows, ld.decoding.pad_token(model))
    if eos is not None:
        for row, prompt in zip(out.rows, prompts):
            new = row.tokens[len(prompt):]
            assert eos not in new[:-1]  # a row stops at its first EOS


def left_padded(prompts, pad):
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_a_left_padded_tensor_gives_the_rows_of_the_list():
    model = tiny_model("llama")
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], [7, 7, 7]]
    config = ld.LookaheadConfig(3, 3, 2)
    listed = ld.generate(model, prompts, 15, config, batch_size=3)
    ids, mask = left_padded(prompts, pad=7)  # the pad id occurs in the prompts: only the mask says what is padding
    padded = ld.generate(model, ids, 15, config, attention_mask=mask, batch_size=3)
    assert [row.tokens for row in padded.rows] == [row.tokens for row in listed.rows]
    assert [row.tokens for row in padded.rows] == [reference_tokens(model, p, 15) for p in prompts]
    # The input as given, then the new tokens
    assert padded.sequences[:, : ids.shape[1]].tolist() == ids.tolist()
    assert padded.sequences[:, ids.shape[1]:].tolist() == listed.sequences[:, ids.shape[1]:].tolist()


def test_the_scheduler_admits_into_free_rows_and_retires_finished_ones():
    model = tiny_model("qwen3")
    config = ld.LookaheadConfig(2, 3, 2)
    prompts = {"a": [3, 4, 5, 3, 4, 5], "b": [10, 11], "c": [20, 21, 22, 23], "d": [1, 1, 2, 1, 1, 2, 1], "e": [8]}
    budgets = {"a": 1, "b": 7, "c": 3, "d": 12, "e": 0}
    runner = StaticStep(model, config, 64, batch_size=2)
    scheduler = BatchScheduler(runner, StepPlan((config,), (1.0,)), lambda: make_source(None, (config,)))
    for tag, prompt in prompts.items():
        scheduler.submit(Request(list(prompt), budgets[tag], tag=tag))
    assert not scheduler.idle and scheduler.active == 0
    finished, occupants, steps = [], [], 0
    while not scheduler.idle:
        before = [None if row is None else row.request.tag for row in scheduler.rows]
        done = scheduler.step()
        steps += 1
        assert steps < 100
        assert scheduler.active <= 2
        for result in done:
            assert result.tag not in [None if row is None else row.request.tag for row in scheduler.rows]
        occupants.append((before, [None if row is None else row.request.tag for row in scheduler.rows]))
        finished.extend(done)
    assert scheduler.active == 0 and not scheduler.waiting
    assert sorted(result.tag for result in finished) == sorted(prompts)
    for result in finished:
        prompt, budget = prompts[result.tag], budgets[result.tag]
        assert len(result.tokens) - len(prompt) == budget
        assert result.tokens == reference_tokens(model, prompt, budget) if budget else result.tokens == prompt
    order = [result.tag for result in finished]
    # "a" takes one token (its prefill) and leaves at once, freeing its row for "c" at the next step; "e" needs no
    # row; "c" (3 tokens) ends before "b" (7) and "b" before "d" (12)
    assert order.index("a") < order.index("c") < order.index("b") < order.index("d")
    assert order.index("e") < order.index("d")
    ever_placed = {tag for _, after in occupants for tag in after if tag is not None}
    ever_placed |= {tag for before, _ in occupants for tag in before if tag is not None}
    assert "e" not in ever_placed and ever_placed == {"b", "c", "d"}  # "a" retires within its admitting step
    # A freed row is taken by the next waiting request at the next step
    row_tags = [[after[i] for _, after in occupants] for i in range(2)]
    assert any(len({tag for tag in tags if tag is not None}) >= 2 for tags in row_tags)
    for before, after in occupants:
        for i in range(2):
            if before[i] is not None and after[i] is not None and before[i] != after[i]:
                pytest.fail(f"row {i} changed from {before[i]} to {after[i]} without being freed first")
    assert scheduler.stats.new_tokens == sum(budgets.values())


def test_a_freed_row_is_refilled_at_the_next_step():
    model = tiny_model("llama")
    config = ld.LookaheadConfig(2, 3, 2)
    runner = StaticStep(model, config, 64, batch_size=2)
    scheduler = BatchScheduler(runner, StepPlan((config,), (1.0,)), lambda: make_source(None, (config,)))
    for tag, budget in (("long", 20), ("short", 2), ("next", 4)):
        scheduler.submit(Request([4, 5, 6, 4, 5], budget, tag=tag))
    tags = []
    while not scheduler.idle:
        done = scheduler.step()
        tags.append(([row.request.tag if row else None for row in scheduler.rows], [r.tag for r in done]))
    freed = next(i for i, (_, done) in enumerate(tags) if "short" in done)
    assert tags[freed][0] == ["long", None]
    assert tags[freed + 1][0][1] == "next"  # the freed row holds the waiting request one step later
    assert [done for _, done in tags if done] == [["short"], ["next"], ["long"]]


def test_sampling_a_batch_is_reproducible_from_one_seed():
    model = tiny_model("gpt2")
    prompts = [[1, 2, 3, 1, 2, 3], [40, 41], [7, 8, 9, 10, 7]]
    config = ld.LookaheadConfig(3, 3, 2)

    def sample(seed):
        out = ld.generate(model, prompts, 20, config, do_sample=True, generator=torch.Generator().manual_seed(seed))
        assert [len(row.tokens) - len(p) for row, p in zip(out.rows, prompts)] == [20] * 3
        return [row.tokens for row in out.rows]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


# Budgets whose rows free often (one to two rows a step): waiting groups the refills, in as many steps.
OFTEN = [6, 5, 4, 3] + [3] * 10
# Budgets whose first row frees after ten steps, the next one two steps later: the first refill does not wait.
SELDOM = [12, 30, 30, 30, 3, 3]


@pytest.mark.parametrize("budgets, patience, prefills, steps", [
    (OFTEN, 0, [4, 1, 1, 2, 2, 2, 2], 9), (OFTEN, 1.0, [4, 2, 4, 4], 9), (OFTEN, 2.0, [4, 3, 4, 3], 10),
    (SELDOM, 1.0, [4, 1, 1], 29)])
def test_free_rows_wait_for_company_while_rows_free_often_enough(budgets, patience, prefills, steps):
    """While more requests wait than rows are free, free rows wait for the next row to free (at the rate rows have
    freed so far) as long as the row-steps they lose stay within `refill_patience` steps of the whole batch (4 rows
    here); refilled together, several rows pay for one prefill. A request that fits in the free rows, or free rows
    that rows join too seldom, are admitted at once. Every request's tokens stay its own."""
    model = tiny_model("llama")
    runner = StaticStep(model, AUTOREGRESSIVE, 64, batch_size=4)
    scheduler = BatchScheduler(runner, StepPlan((AUTOREGRESSIVE,), (1.0,)),
                               lambda: make_source(None, (AUTOREGRESSIVE,)), refill_patience=patience)
    prompts = [[tag + 1, tag + 2, tag + 3] for tag in range(len(budgets))]
    for tag, (prompt, budget) in enumerate(zip(prompts, budgets)):
        scheduler.submit(Request(prompt, budget, tag=tag))
    admitted, results = [], {}  # the requests each prefill admitted
    while not scheduler.idle:
        waiting = len(scheduler.waiting)
        results.update((result.tag, result.tokens) for result in scheduler.step())
        if len(scheduler.waiting) < waiting:
            admitted.append(waiting - len(scheduler.waiting))
    assert (admitted, scheduler.stats.steps, scheduler.stats.prefills) == (prefills, steps, len(prefills))
    for tag, prompt in enumerate(prompts):
        assert results[tag] == ld.generate(model, [prompt], budgets[tag], AUTOREGRESSIVE).rows[0].tokens


@pytest.mark.parametrize("patience", [-1, float("nan"), float("inf"), True, "1"])
def test_a_bad_refill_patience_is_refused(patience):
    runner = StaticStep(tiny_model("llama"), AUTOREGRESSIVE, 64, batch_size=2)
    with pytest.raises(ValueError, match=f"refill_patience must be a finite number >= 0 \\(0: refill at once\\), "
                                         f"got {patience!r}"):
        BatchScheduler(runner, StepPlan((AUTOREGRESSIVE,), (1.0,)), lambda: make_source(None, (AUTOREGRESSIVE,)),
                       refill_patience=patience)


@pytest.mark.parametrize("sampled, pipelined", [(False, False), (True, False), (False, True), (True, True)])
def test_a_refill_runs_its_prefill_on_the_new_rows_alone(sampled, pipelined):
    """Rows admitted mid-batch are prefilled by forwards on them (their number rounded up to a power of two: the
    others are rows that ride along mid-decode), not on the whole batch; every row's tokens stay its own, sampled
    or not, with plain steps pipelined or not."""
    model = tiny_model("llama")
    config = AUTOREGRESSIVE  # one token per step: the rows finish when their budgets say
    runner = StaticStep(model, config, 64, batch_size=5, prefill_chunk=4, sampling=sampled, pipeline=pipelined)
    batches = counted_forwards(runner)
    scheduler = BatchScheduler(runner, StepPlan((config,), (1.0,)), lambda: make_source(None, (config,)),
                               refill_patience=0)  # each free row refilled at once
    generator = torch.Generator().manual_seed(3)
    # Budgets that free one row, then two, then three at once; prompts of one to three prefill chunks.
    budgets = [2, 40, 6, 6, 40, 9, 5, 5, 12, 12, 12]
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
               for n in torch.randint(1, 12, (len(budgets),), generator=generator)]
    params = [ld.SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=tag) if sampled else None
              for tag in range(len(prompts))]
    for tag, (prompt, budget) in enumerate(zip(prompts, budgets)):
        scheduler.submit(Request(prompt, budget, tag=tag, sampling=params[tag]))
    prefills, results = [], {}
    while not scheduler.idle:
        waiting, before = len(scheduler.waiting), len(batches)
        results.update((result.tag, result.tokens) for result in scheduler.step())
        if len(scheduler.waiting) < waiting:  # the step's own forward is its last
            prefills.append((waiting - len(scheduler.waiting), set(batches[before:-1])))
    assert prefills == [(5, {5}), (1, {1}), (2, {2}), (3, {4})]
    for tag, prompt in enumerate(prompts):
        alone = ld.generate(model, [prompt], budgets[tag], AUTOREGRESSIVE, **(
            dict(do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=[tag]) if sampled else {}))
        assert results[tag] == alone.rows[0].tokens


class StopAfter(transformers.StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_a_stopping_criterion_stops_only_its_row():
    model = tiny_model("gpt_neox")
    prompts = [[2, 3, 4, 2, 3], [50, 51, 52], [11, 12, 11, 12, 11], [70]]
    alone = [reference_tokens(model, p, 25) for p in prompts]
    stop = alone[0][len(prompts[0]) + 3]  # the fourth new token of row 0
    criteria = transformers.StoppingCriteriaList([StopAfter(stop)])
    expected = [reference_tokens(model, p, 25, stopping_criteria=criteria) for p in prompts]
    out = ld.generate(model, prompts, 25, ld.LookaheadConfig(3, 3, 2), stopping_criteria=criteria, batch_size=3)
    assert [row.tokens for row in out.rows] == expected
    assert len(out.rows[0].tokens) - len(prompts[0]) <= 4
    lengths = [len(row.tokens) - len(p) for row, p in zip(out.rows, prompts)]
    assert 25 in lengths  # some row never meets the criterion and runs to max_new_tokens
    for row, prompt, length in zip(out.rows, prompts, lengths):
        assert length == 25 or row.tokens[-1] == stop


@pytest.mark.parametrize("stops_on_eos", [False, True])
def test_pipelined_plain_steps_decode_one_step_more_only_after_an_end_of_sequence(stops_on_eos):
    """Every plain step after the first is launched behind the one before, before the host reads it. A sequence
    that reaches max_new_tokens is known to stop and is left out in time; one that stops on an EOS token has
    decoded one step more, which costs a forward and is thrown away (it is not counted as a step)."""
    model = tiny_model("llama")
    prompt = [3, 1, 4, 1, 5]
    new = reference_tokens(model, prompt, 20)[len(prompt):]
    eos = new[9] if stops_on_eos else None
    expected = reference_tokens(model, prompt, 20, eos_token_id=eos)
    runner = StaticStep(model, AUTOREGRESSIVE, 32, pipeline=True)
    chains, forwards = recorded_chains(runner), counted_forwards(runner)
    out = ld.generate(model, [prompt], 20, AUTOREGRESSIVE, runner=runner, eos_token_id=eos)
    assert out.rows[0].tokens == expected
    assert out.stats.steps == len(expected) - len(prompt) - 1  # the prefill commits the first token
    assert len(forwards) == 1 + out.stats.steps + stops_on_eos
    assert chains == [{}] * (out.stats.steps - 1 + stops_on_eos)


def test_pipelined_rows_start_and_stop_through_the_chained_steps():
    """Rows refilled, stopped by EOS or by their budgets while plain steps are pipelined: each row's tokens are its
    own greedy decode; a row that starts enters a chained step with its prefill's token, one that stops leaves."""
    model = tiny_model("qwen3")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
               for n in torch.randint(1, 9, (9,), generator=generator)]
    budgets = [3, 17, 6, 9, 2, 12, 5, 8, 14]
    eos = reference_tokens(model, prompts[1], 17)[len(prompts[1]) + 4]  # stops row 1 (and maybe others) early
    runner = StaticStep(model, AUTOREGRESSIVE, 48, batch_size=3, pipeline=True)
    chains = recorded_chains(runner)
    out = ld.generate(model, prompts, budgets, AUTOREGRESSIVE, runner=runner, eos_token_id=eos)
    assert [row.tokens for row in out.rows] == [reference_tokens(model, prompt, budget, eos_token_id=eos)
                                                for prompt, budget in zip(prompts, budgets)]
    changes = [row_change for chain in chains for row_change in chain.values()]
    assert None in changes and any(token is not None for token in changes)
    assert len(chains) > out.stats.steps / 2


@pytest.mark.parametrize("sampled", [False, True])
def test_a_switch_between_shapes_that_draft_on_the_device_is_chained(sampled, monkeypatch):
    """The batch alternates between the plain step and two trees drafted on the device (one with a window), every
    step launched behind the unread one before it: a chained step of another shape lays every row out afresh,
    taking a row's current token from the step before on the device. Refills, EOS and budgets as above; each row
    gets its own tokens, greedy or sampled."""
    model = tiny_model("llama")
    shapes = (AUTOREGRESSIVE, FIXED["device"], FIXED["device window"])
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
               for n in torch.randint(2, 10, (7,), generator=generator)]
    prompts[3] = (prompts[3][:2] * 6)[:11]  # repetitive: the trees accept several tokens
    budgets = [20, 7, 14, 20, 3, 11, 16]
    sampling = dict(do_sample=True, temperature=0.8, seed=list(range(7))) if sampled else {}
    plain = ld.generate(model, prompts, budgets, AUTOREGRESSIVE, **sampling)
    eos = plain.rows[0].tokens[len(prompts[0]) + 9]
    expected = [row.tokens for row in ld.generate(model, prompts, budgets, AUTOREGRESSIVE, eos_token_id=eos,
                                                  **sampling).rows]
    order = iter(range(10**6))
    monkeypatch.setattr(scheduler_module, "best_shape", lambda *args, **kwargs: next(order) % len(shapes))
    runner = StaticStep(model, shapes, 64, batch_size=3, pipeline=True, sampling=sampled)
    kinds, chain = [], runner.chain
    runner.chain = lambda previous, changes, *rest: kinds.append(bool(rest) and rest[0] != previous.shape) or \
        chain(previous, changes, *rest)
    out = ld.generate(model, prompts, budgets, StepPlan(shapes, (1.0, 1.0, 1.0)), runner=runner, eos_token_id=eos,
                      **sampling)
    assert [row.tokens for row in out.rows] == expected
    assert sum(kinds) > out.stats.steps / 2  # most steps were chained behind one of another shape


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_cancelled_request_frees_its_row_for_the_next(pipelined):
    """A server cancels the request of a client that went away: a waiting one leaves the queue at once with no new
    tokens; a decoding one stops at the next step with a prefix of its own decode (a step launched behind it is
    thrown away), and its row goes to the next request; the other rows are unaffected."""
    model = tiny_model("llama")
    runner = StaticStep(model, AUTOREGRESSIVE, 64, batch_size=2, pipeline=pipelined)
    scheduler = BatchScheduler(runner, StepPlan((AUTOREGRESSIVE,), (1.0,)),
                               lambda: make_source(None, (AUTOREGRESSIVE,)))
    prompts = {"a": [3, 1, 4, 1, 5], "b": [2, 7, 1, 8], "c": [1, 6, 1, 8, 0], "d": [9, 9, 8]}
    for tag, prompt in prompts.items():
        scheduler.submit(Request(prompt, 20, tag=tag))
    results = {}
    for _ in range(6):
        results.update((result.tag, result) for result in scheduler.step())
    assert scheduler.cancel("d").tokens == prompts["d"]
    assert scheduler.cancel("a") is None
    while not scheduler.idle:
        results.update((result.tag, result) for result in scheduler.step())
    cancelled = results["a"].tokens
    assert 5 <= len(cancelled) - len(prompts["a"]) < 20
    assert cancelled == reference_tokens(model, prompts["a"], 20)[: len(cancelled)]
    assert [results[tag].tokens for tag in "bc"] == [reference_tokens(model, prompts[tag], 20) for tag in "bc"]
    assert sorted(results) == ["a", "b", "c"]


def test_a_row_with_stopping_criteria_is_never_pipelined():
    """Stopping criteria read a step's logits, which a step launched behind it would overwrite on the device."""
    model = tiny_model("llama")
    prompts = [[2, 3, 4, 2, 3], [50, 51, 52]]
    stop = reference_tokens(model, prompts[0], 12)[len(prompts[0]) + 3]
    criteria = transformers.StoppingCriteriaList([StopAfter(stop)])
    runner = StaticStep(model, AUTOREGRESSIVE, 32, batch_size=2, pipeline=True)
    chains = recorded_chains(runner)
    out = ld.generate(model, prompts, 12, AUTOREGRESSIVE, runner=runner, stopping_criteria=criteria)
    assert [row.tokens for row in out.rows] == [reference_tokens(model, p, 12, stopping_criteria=criteria)
                                                for p in prompts]
    assert chains == []


def test_a_sliding_window_model_cannot_batch():
    model = tiny_model("mistral")
    with pytest.raises(UnsupportedModelError, match=r"MistralForCausalLM uses sliding-window attention, which the "
                                                    r"static engine does not support"):
        ld.generate(model, [[1, 2, 3], [4, 5]], 5, ld.LookaheadConfig(2, 3, 2))


def test_each_prompt_can_have_its_own_max_new_tokens():
    model = tiny_model("llama")
    prompts = [[4, 5, 6, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
    out = ld.generate(model, prompts, [3, 0, 9], ld.LookaheadConfig(3, 3, 2), batch_size=2)
    assert [row.stats.new_tokens for row in out.rows] == [3, 0, 9]
    for prompt, limit, row in zip(prompts, [3, 0, 9], out.rows):
        assert row.tokens == (reference_tokens(model, prompt, limit) if limit else prompt)


@pytest.mark.parametrize("limits, message", [
    ([3], "max_new_tokens has 1 values for 2 prompts; give one per prompt or one int"),
    ([3, -1], "max_new_tokens must be a non-negative integer, got -1"),
    ([3, 2.0], "max_new_tokens must be a non-negative integer, got 2.0"),
])
def test_bad_per_prompt_limits_are_refused(limits, message):
    with pytest.raises(ValueError) as info:
        ld.generate(tiny_model("llama"), [[1, 2], [3]], limits, ld.LookaheadConfig(2, 2, 2))
    assert str(info.value) == message


@pytest.mark.parametrize("prompt, max_new_tokens, message", [
    ([], 4, "request 'x': the prompt is empty"),
    ([1] * 30, 11, "request 'x': prompt (30 tokens) + max_new_tokens (11) = 41 tokens does not fit this engine's "
                   "max_length 40"),
])
def test_the_scheduler_refuses_a_request_that_cannot_fit(prompt, max_new_tokens, message):
    config = ld.LookaheadConfig(2, 2, 2)
    runner = StaticStep(tiny_model("llama"), config, 40, batch_size=2)
    scheduler = BatchScheduler(runner, StepPlan((config,), (1.0,)), lambda: make_source(None, (config,)))
    with pytest.raises(ValueError) as info:
        scheduler.submit(Request(prompt, max_new_tokens, tag="x"))
    assert str(info.value) == message
    assert scheduler.idle  # nothing was queued


# ---------------------------------------------------------------------------------------------- a tokenizer's batch


PADDED_PROMPTS = [[5, 6, 7, 5, 6, 7, 5], [9], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], [7, 7, 7]]


def tokenizer_batch(prompts, pad, tensor_type=None) -> transformers.BatchEncoding:
    """What `tokenizer(texts, padding=True, return_tensors=tensor_type)` returns with padding_side="left": lists
    by default, else numpy arrays ("np") or tensors ("pt")."""
    longest = max(map(len, prompts))
    return transformers.BatchEncoding({
        "input_ids": [[pad] * (longest - len(p)) + p for p in prompts],
        "attention_mask": [[0] * (longest - len(p)) + [1] * len(p) for p in prompts],
    }, tensor_type=tensor_type)


@pytest.mark.parametrize("ids_type, mask_type, whole", [
    (None, None, False), ("np", "np", False), (None, "pt", False), ("pt", None, False), ("np", "pt", False),
    (None, None, True), ("np", "np", True), ("pt", "pt", True),
], ids=["lists", "numpy", "list-ids-tensor-mask", "tensor-ids-list-mask", "numpy-ids-tensor-mask",
        "encoding-of-lists", "encoding-of-numpy", "encoding-of-tensors"])
def test_a_padded_batch_honours_its_mask_in_every_form(ids_type, mask_type, whole):
    model = tiny_model("llama")
    config = ld.LookaheadConfig(3, 3, 2)
    ids = tokenizer_batch(PADDED_PROMPTS, pad=7, tensor_type=ids_type)["input_ids"]  # 7 also occurs in the prompts
    mask = tokenizer_batch(PADDED_PROMPTS, pad=7, tensor_type=mask_type)["attention_mask"]
    if whole:
        out = ld.generate(model, transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask}), 12, config)
    else:
        out = ld.generate(model, ids, 12, config, attention_mask=mask)
    assert [row.tokens for row in out.rows] == [reference_tokens(model, p, 12) for p in PADDED_PROMPTS]
    width = len(tokenizer_batch(PADDED_PROMPTS, pad=7)["input_ids"][0])
    assert out.sequences[:, :width].tolist() == tokenizer_batch(PADDED_PROMPTS, pad=7)["input_ids"]  # as given


@pytest.mark.parametrize("inputs, attention_mask, error, message", [
    ([[1, 2, 3], [4, 0, 0]], [[1, 1, 1], [1, 0, 0]], ValueError,
     "row 1 of attention_mask is not left-padded (zeros after ones); lookahead decoding takes left-padded batches: "
     "set tokenizer.padding_side = 'left'"),
    ([[1, 2, 3], [4, 5]], [[1, 1, 1], [1, 1, 1]], ValueError,
     "attention_mask must have input_ids' shape (2 rows of lengths [3, 2]), got (2, 3)"),
    ([[1, 2, 3], [4, 5, 6]], [1, 1, 1], TypeError,
     "attention_mask must be a tensor, a numpy array or a list of rows of 0s and 1s, got list"),
    (transformers.BatchEncoding({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}), [[1, 1]], ValueError,
     "attention_mask is given twice: inside the encoding passed as input_ids and as an argument; pass it once"),
    (transformers.BatchEncoding({"attention_mask": [[1, 1]]}), None, ValueError,
     "the encoding passed as input_ids has no 'input_ids'"),
])
def test_a_mask_that_cannot_be_honoured_is_refused(inputs, attention_mask, error, message):
    with pytest.raises(error) as info:
        ld.generate(tiny_model("llama"), inputs, 5, ld.LookaheadConfig(2, 2, 2), attention_mask=attention_mask)
    assert str(info.value) == message


class CountingSource(ld.CandidateSource):
    """Proposes nothing; counts what the decoding loop asks of it."""

    predictions_wanted = 4

    def __init__(self):
        self.calls, self.told = [], 0

    def begin(self, prompt):
        self.calls.append(("begin", len(prompt)))

    def propose(self, history, max_length, budget):
        self.calls.append(("propose", len(history)))
        return []

    def observe(self, history, num_new):
        self.calls.append(("observe", num_new))
        self.told = len(history)

    def observe_predictions(self, predictions):
        self.calls.append(("predictions", len(predictions.tokens)))


@pytest.mark.parametrize("wide_cost", [1000.0, 1.0])
def test_plain_steps_do_no_work_for_the_sources(wide_cost):
    """A batch that settles on plain steps must cost what plain decoding costs: no source is begun, told of text
    or handed predictions. Once drafting steps run, the source sees the prompt once and every committed token
    exactly once (a step late at most), and predictions only from the steps that verified drafts."""
    model = tiny_model("llama", seed=4)
    wide = ld.LookaheadConfig(window=3, ngram=3, guesses=3)
    plan = StepPlan((AUTOREGRESSIVE, wide), (1.0, wide_cost))  # 1000: the plain step always wins
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    source = CountingSource()
    out = ld.generate(model, [prompt], max_new_tokens=20, config=plan, source=source)
    assert out.rows[0].tokens == greedy_reference(model, torch.tensor([prompt]), 20)[0].tolist()
    if wide_cost > 1.0:
        assert out.stats.shape_steps == {"plain": out.stats.steps}
        assert source.calls == []
        return
    assert source.calls[0] == ("begin", len(prompt))
    told = [n for kind, n in source.calls if kind == "observe"]
    assert sum(told) == source.told - len(prompt) and source.told >= len(out.rows[0].tokens) - 2
    predictions = [n for kind, n in source.calls if kind == "predictions"]
    assert len(predictions) == out.stats.shape_steps[shape_name(wide)]


class BusyDevice:
    """The CPU engine, made to answer that its device still computes for the first `answers` questions of each
    step (as a CUDA step does while it runs)."""

    def __init__(self, runner: StaticStep, answers: int, asynchronous: bool = False):
        self.runner, self.answers, self.asynchronous = runner, answers, asynchronous
        self.layouts, self.adapter, self.batch_size = runner.layouts, runner.adapter, runner.batch_size
        self.predictions, self.max_length, self.sampler = runner.predictions, runner.max_length, runner.sampler

    def prefill_rows(self, prompts, sampling=None):
        return self.runner.prefill_rows(prompts, sampling)

    def step_rows(self, shape, steps, histories, overlap=None):
        answered = iter(range(self.answers))
        return self.runner.step_rows(shape, steps, histories,
                                     lambda device_busy: overlap(lambda: next(answered, None) is not None))


def test_sources_catch_up_while_the_device_computes_a_plain_step():
    """While the device computes a plain step, the host would only wait: the rows' sources begin from their
    prompts and hear of every committed token then, row by row, until the device is done. The row the device
    leaves no time for is not touched (its source begins at its first draft), and no row is asked for drafts."""
    model = tiny_model("llama", seed=4)
    wide = ld.LookaheadConfig(window=3, ngram=3, guesses=3)
    plan = StepPlan((AUTOREGRESSIVE, wide), (1.0, 1000.0))  # the plain step always wins
    runner = BusyDevice(StaticStep(model, plan.shapes, 64, batch_size=3, predictions=4), answers=2)
    scheduler = BatchScheduler(runner, plan, lambda memory=None: make_source(None, plan.shapes))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3]]
    sources = [CountingSource() for _ in prompts]
    for tag, (prompt, source) in enumerate(zip(prompts, sources)):
        scheduler.submit(Request(prompt, 12, source=source, tag=tag))
    results = sorted(scheduler.run(), key=lambda finished: finished.tag)
    for prompt, result in zip(prompts, results):
        assert result.tokens == reference_tokens(model, prompt, 12)
    assert scheduler.steps_by_shape == {"plain": scheduler.stats.steps}
    for prompt, source in zip(prompts[:2], sources):
        told = [n for kind, n in source.calls[1:] if kind == "observe"]
        assert source.calls[0] == ("begin", len(prompt)) and len(told) == len(source.calls) - 1
        # Told during each step of what the steps before it committed: all but the last step's token.
        assert sum(told) == 12 - 1 and source.told == len(prompt) + 12 - 1
    assert sources[2].calls == []


def test_a_source_begins_while_the_device_computes_never_in_a_drafting_step():
    """Where steps run asynchronously, a row whose source has not indexed its prompt drafts nothing in a lookahead
    step (indexing would hold the step up): it begins while the device computes, and drafts from the next step."""
    model = tiny_model("llama", seed=4)
    wide = ld.LookaheadConfig(window=3, ngram=3, guesses=3)
    plan = StepPlan((wide,), (1.0,))  # every step drafts
    runner = BusyDevice(StaticStep(model, plan.shapes, 64, batch_size=3, predictions=4), answers=3, asynchronous=True)
    scheduler = BatchScheduler(runner, plan, None)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3]]
    sources = [CountingSource() for _ in prompts]
    for tag, (prompt, source) in enumerate(zip(prompts, sources)):
        scheduler.submit(Request(prompt, 12, source=source, tag=tag))
    results = sorted(scheduler.run(), key=lambda finished: finished.tag)
    assert [result.tokens for result in results] == [reference_tokens(model, prompt, 12) for prompt in prompts]
    for prompt, source in zip(prompts, sources):
        proposals = [n for kind, n in source.calls if kind == "propose"]
        assert source.calls[0] == ("begin", len(prompt))
        assert len(proposals) == scheduler.stats.steps - 1  # not at the first step, at every one after



DEVICE_TREE = ld.LookaheadConfig(window=1, ngram=2, guesses=0, candidate_length=4, tree_nodes=7, device_drafts=True)


def python_calls_per_step(shape: ld.LookaheadConfig, batch: int, streamer=None) -> float:
    """Python function calls (profiler "call" events, the model's forward included) per batched step of `shape`,
    once every row decodes; `streamer`: given to the first row's request."""
    model = tiny_model("llama", seed=2)
    plan = StepPlan((shape,), (1.0,))
    scheduler = BatchScheduler(StaticStep(model, plan.shapes, 160, batch_size=batch), plan,
                               lambda memory=None: make_source(None, plan.shapes))
    for tag in range(batch):
        scheduler.submit(Request([3 + tag, 1, 4, 1, 5], 150, streamer=streamer if tag == 0 else None, tag=tag))
    for _ in range(3):  # admission, prefill and the first steps
        scheduler.step()
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    gc.collect()
    gc.disable()  # as `BatchScheduler.run` does; a collection would call other tests' finalizers
    sys.setprofile(count)
    try:
        for _ in range(6):
            assert not scheduler.step()  # no row stops meanwhile
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls / 6


@pytest.mark.parametrize("shape", [AUTOREGRESSIVE, DEVICE_TREE], ids=["plain", "device-drafted tree"])
def test_a_step_that_drafts_nothing_on_the_host_runs_no_python_per_row(shape):
    """Choosing the shape, laying out the step, committing each row's tokens, testing its budget and EOS and
    counting its step are array work: batch 8 makes exactly the Python calls batch 2 does. A row with a streamer
    needs Python after every token, so it costs more."""
    torch.set_num_threads(1)
    assert python_calls_per_step(shape, 8) == python_calls_per_step(shape, 2)
    assert python_calls_per_step(shape, 8, streamer=CountingStreamer()) > python_calls_per_step(shape, 8)


class CountingStreamer:
    def __init__(self) -> None:
        self.tokens = 0

    def put(self, value) -> None:
        self.tokens += value.numel()

    def end(self) -> None:
        pass


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.lists(st.tuples(st.integers(0, VOCAB - 1), st.booleans(), st.booleans()), min_size=3, max_size=3))
def test_token_rows_lay_out_a_step_as_the_planned_steps_do(rows):
    """A `TokenRows` step (each row's current token, whether it decodes, whether it drafts on the device) fills the
    engine's input lines exactly as each row's planned step does."""
    model = tiny_model("llama", seed=3)
    engine = StaticStep(model, (AUTOREGRESSIVE, DEVICE_TREE), 32, batch_size=3)
    template = template_tree(TemplateShape.of(DEVICE_TREE))
    for shape, layout in enumerate(engine.layouts):
        steps = [PlannedStep(shape, [token] * layout.size, template if drafts and layout.config.device_drafts
                             else EMPTY_TREE) if decodes else None for token, decodes, drafts in rows]
        engine._write_planned(shape, steps, [[token] for token, _, _ in rows])
        planned = engine.host_inputs[shape].clone()
        engine.host_inputs[shape].fill_(-1)
        current, decoding, drafting = (numpy.array(column) for column in zip(*rows))
        engine._write_token_rows(shape, TokenRows(current, decoding, drafting, numpy.ones(3, dtype=numpy.int64)))
        assert engine.host_inputs[shape].tolist() == planned.tolist()
