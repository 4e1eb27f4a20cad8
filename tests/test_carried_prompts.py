"""Prompts that ride in a batch's steps instead of a prefill (`StaticStep.carry_prompts`,
`scheduler.PREFILL_STALL_STEPS`): the row ends up as its prefill would leave it, and every sequence keeps exactly its
greedy tokens."""

import numpy
import pytest
import torch
from conftest import VOCAB, greedy_reference, tiny_model

import lookahead_decoding as ld
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.device_drafts import TOP_K
from lookahead_decoding.drafting.base import NoDrafts
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.scheduler import PREFILL_STALL_STEPS, BatchScheduler, Request
from lookahead_decoding.step import PromptPart, TokenRows
from lookahead_decoding.tuning import StepPlan

DEVICE_SHAPE = ld.LookaheadConfig(1, 2, 1, candidate_length=4, tree_nodes=10, device_drafts=True)  # 11 rows a step
STEP_ROWS = 1 + DEVICE_SHAPE.tree_nodes


def token_rows(runner: StaticStep, current: dict[int, int], prompts: dict[int, list[int]], ends: bool = False
               ) -> TokenRows:
    """Rows in `current` decode from their current token, drafting on the device; rows in `prompts` carry ids (the
    prompt's last if `ends`)."""
    rows = runner.batch_size
    tokens, decoding = numpy.zeros(rows, dtype=numpy.int64), numpy.zeros(rows, dtype=bool)
    for row, token in current.items():
        tokens[row], decoding[row] = token, True
    parts = {row: PromptPart(ids, ends) for row, ids in prompts.items()}
    return TokenRows(tokens, decoding, decoding.copy(), numpy.zeros(rows, dtype=numpy.int64), parts)


def test_a_carried_prompt_leaves_its_row_as_its_prefill_would(llama):
    """Row 1's prompt rides in three steps (11, 11 and 3 ids) while row 0 decodes: its cache, its length, its text,
    its own tables and its first token are what a prefill of the prompt gives; row 0 decodes its greedy tokens."""
    generator = torch.Generator().manual_seed(3)
    first_prompt, prompt = ([int(t) for t in torch.randint(0, VOCAB, (n,), generator=generator)] for n in (6, 25))
    prefilled = StaticStep(llama, DEVICE_SHAPE, 96, batch_size=2)
    prefilled.prefill_rows({0: first_prompt})
    expected_first = prefilled.prefill_rows({1: prompt})[1].committed
    carrying = StaticStep(llama, DEVICE_SHAPE, 96, batch_size=2)
    history = first_prompt + carrying.prefill_rows({0: first_prompt})[0].committed
    carrying.carry_prompts([1])
    outcomes = []
    for begin in range(0, len(prompt), STEP_ROWS):
        chunk = prompt[begin : begin + STEP_ROWS]
        ends = begin + STEP_ROWS >= len(prompt)
        outcomes.append(carrying.step_rows(0, token_rows(carrying, {0: history[-1]}, {1: chunk}, ends), None))
        history += outcomes[-1][0].committed
    assert outcomes[-1][1].committed == expected_first and outcomes[-1][1].accepted == 0
    assert history == greedy_reference(llama, torch.tensor([first_prompt]), len(history) - 6)[0].tolist()
    assert carrying.lengths[1] == len(prompt) and carrying.length_bound[1] == len(prompt)
    assert carrying.drafter.text[1, : len(prompt) + 1].tolist() == prompt + expected_first
    for layer, reference in zip(carrying.cache.layers, prefilled.cache.layers):
        for states, expected in ((layer.keys, reference.keys), (layer.values, reference.values)):
            torch.testing.assert_close(states[1, :, : len(prompt)], expected[1, :, : len(prompt)])
    own = carrying.drafter.row_tables
    tops = llama(torch.tensor([prompt])).logits[0].topk(TOP_K).indices.tolist()
    for position, token in enumerate(prompt):  # the latest write of a token that recurs: its last position
        last = max(p for p, t in enumerate(prompt) if t == token)
        assert own.followers[own.bases[1, 0] + token].tolist() == tops[last]


@pytest.mark.parametrize("pipelined", [False, True])
def test_short_prompts_admitted_while_rows_decode_ride_in_their_steps(pipelined):
    """Nine requests through three rows: the first three are prefilled together, the others, admitted while rows
    decode, ride in the steps, except the two whose prompts take more steps than their prefill would stall the
    rows that decode, 1.5 steps each: 34 ids (4 steps of 11) with two rows decoding, 33 (3 steps) with one."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(5)
    two_rows_stall = int(PREFILL_STALL_STEPS * 2) * STEP_ROWS  # the longest prompt that rides beside two rows
    lengths = (3, 9, 5, 12, 4, 30, two_rows_stall + 1, 2, two_rows_stall)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    budgets = [30, 6, 25, 3, 17, 20, 9, 14, 11]
    eos = greedy_reference(model, torch.tensor([prompts[0]]), 30)[0, len(prompts[0]) + 12].item()
    runner = StaticStep(model, DEVICE_SHAPE, 128, batch_size=3, pipeline=pipelined)
    chained, chain = [], runner.chain
    runner.chain = lambda previous, changes, shape=None, rows=None: chained.append((previous, rows)) or \
        chain(previous, changes, shape, rows)
    out = ld.generate(model, prompts, budgets, DEVICE_SHAPE, runner=runner, eos_token_id=eos)
    for prompt, budget, row in zip(prompts, budgets, out.rows):
        assert row.tokens == greedy_reference(model, torch.tensor([prompt]), budget, eos_token_id=eos)[0].tolist()
    assert (out.stats.prefills, out.stats.carried_prompts) == (3, 4)
    # Pipelined, steps that carry ids are launched behind unread ones, and steps behind them go on from the device.
    assert any(rows is not None and rows.prompts for _, rows in chained) == pipelined
    assert any(previous.carried.any() for previous, _ in chained) == pipelined


def test_a_request_cancelled_while_its_prompt_rides_frees_its_row():
    model = tiny_model("llama")
    runner = StaticStep(model, DEVICE_SHAPE, 128, batch_size=3)
    scheduler = BatchScheduler(runner, StepPlan((DEVICE_SHAPE,), (1.0,)), lambda memory=None: NoDrafts())
    generator = torch.Generator().manual_seed(7)
    budgets = (2, 40, 40, 12, 9)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (3, 8, 6, 25, 4)]
    for tag, (prompt, budget) in enumerate(zip(prompts, budgets)):
        scheduler.submit(Request(prompt, budget, tag=tag))
    finished = {}
    while not scheduler.carrying:  # request 0 ends in a step or two, and request 3 takes its row (3 steps)
        assert not scheduler.idle
        finished.update((result.tag, result) for result in scheduler.step())
    assert list(finished) == [0] and scheduler.carrying == {0: prompts[3][STEP_ROWS:]}
    assert scheduler.cancel(3) is None
    while not scheduler.idle:
        finished.update((result.tag, result) for result in scheduler.step())
    assert finished[3].tokens == prompts[3] and not scheduler.carrying
    for tag in (1, 2, 4):
        expected = greedy_reference(model, torch.tensor([prompts[tag]]), budgets[tag])[0].tolist()
        assert finished[tag].tokens == expected
    assert scheduler.stats.carried_prompts == 2


@pytest.mark.parametrize("penalties", [False, True])
def test_sampled_prompts_that_ride_draw_what_plain_sampling_draws(penalties):
    """A sampled row whose prompt rode in the steps draws its first token where a prefill would (its position, the
    penalties knowing its prompt) and every later one as plain sampling with its seed does."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist() for n in (4, 9, 30, 6, 13, 25, 3)]
    budgets = [6, 20, 9, 14, 11, 8, 16]
    kwargs = dict(do_sample=True, temperature=0.9, top_p=0.95, seed=list(range(7)),
                  **(dict(repetition_penalty=3.0, presence_penalty=2.0) if penalties else {}))
    runner = StaticStep(model, DEVICE_SHAPE, 128, batch_size=3, sampling=True)
    out = ld.generate(model, prompts, budgets, DEVICE_SHAPE, runner=runner, **kwargs)
    plain = ld.generate(model, prompts, budgets, AUTOREGRESSIVE, **kwargs)
    assert [row.tokens for row in out.rows] == [row.tokens for row in plain.rows]
    assert out.stats.carried_prompts == 3


def test_an_engine_that_cannot_carry_prompts_says_so(llama):
    window = ld.LookaheadConfig(3, 3, 2, candidate_length=4, tree_nodes=14, device_drafts=True)
    with_window = StaticStep(llama, [DEVICE_SHAPE, window], 64, batch_size=2)
    assert with_window.prompt_carriers == ()
    with pytest.raises(ValueError, match=r"^this engine's steps cannot carry prompts \(it has a verifier, a device "
                                         r"window, or no shape that drafts on the device\): prefill them with "
                                         r"prefill_rows$"):
        with_window.carry_prompts([1])
    runner = StaticStep(llama, [AUTOREGRESSIVE, DEVICE_SHAPE], 64, batch_size=2)
    assert runner.prompt_carriers == (1,)
    with pytest.raises(ValueError, match="^row 2 does not exist in a batch of 2$"):
        runner.carry_prompts([2])
    with pytest.raises(ValueError, match="^this engine decodes greedily; build it with sampling=True to sample or "
                                         "apply penalties$"):
        runner.carry_prompts([1], {1: ld.SamplingParams(temperature=0.5)})
    runner.prefill_rows({0: [1, 2, 3]})
    runner.carry_prompts([1])
    with pytest.raises(ValueError, match=r"^a step of LookaheadConfig\(window=1, ngram=2, guesses=0.*\) cannot carry "
                                         r"prompts; this engine's carriers are shapes \[1\]$"):
        runner.step_rows(0, token_rows(runner, {0: 4}, {1: [5]}), None)
    with pytest.raises(ValueError, match=r"^row 1 carries 12 prompt ids; a step of .* carries 1 to 11$"):
        runner.step_rows(1, token_rows(runner, {0: 4}, {1: list(range(12))}), None)
    with pytest.raises(ValueError, match=r"^row 1 carries 0 prompt ids"):
        runner.step_rows(1, token_rows(runner, {0: 4}, {1: []}), None)
    launched = runner.launch_rows(1, token_rows(runner, {0: 4}, {1: [5, 6]}), None)
    with pytest.raises(ValueError, match="^a step chained behind one of another shape, or where prompt ids ride, "
                                         "needs its rows' TokenRows$"):
        runner.chain(launched, {})


def test_free_rows_do_not_wait_for_company_when_their_prompts_ride():
    """Waiting for company shares a prefill; prompts that ride in the steps have none to share, so free rows take
    them at once, however patient the scheduler (on a plain engine these budgets wait: tests/test_batch.py)."""
    model = tiny_model("llama")
    runner = StaticStep(model, DEVICE_SHAPE, 64, batch_size=4)
    scheduler = BatchScheduler(runner, StepPlan((DEVICE_SHAPE,), (1.0,)), lambda memory=None: NoDrafts(),
                               refill_patience=2.0)
    budgets = [6, 5, 4, 3] + [3] * 10
    prompts = [[tag + 1, tag + 2, tag + 3] for tag in range(len(budgets))]
    for tag, (prompt, budget) in enumerate(zip(prompts, budgets)):
        scheduler.submit(Request(prompt, budget, tag=tag))
    results = {}
    while not scheduler.idle:
        free, waiting = int((~scheduler.occupied).sum()), len(scheduler.waiting)
        results.update((result.tag, result.tokens) for result in scheduler.step())
        assert waiting - len(scheduler.waiting) == min(free, waiting)  # every free row took a request
    assert scheduler.stats.carried_prompts > 0  # (rows that all free at once are prefilled together)
    for tag, prompt in enumerate(prompts):
        assert results[tag] == greedy_reference(model, torch.tensor([prompt]), budgets[tag])[0].tolist()
