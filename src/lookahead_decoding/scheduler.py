"""Continuous batching: sequences decoded side by side in the rows of one step runner, each at its own pace.

    repeat:  admit waiting requests into free rows (one batched prefill) |
             every decoding row drafts its token tree (unless a plain step wins anyway) |
             choose one step shape for the batch |
             one fused forward for all rows | each row commits its own accepted tokens |
             retire the rows that stopped (their results are handed back; the rows are free again)

A row that stops mid-batch is refilled by the next request, without recapturing anything (the runner's shapes do
not depend on which rows decode): at the next step, or a few steps later together with rows that free meanwhile,
which then share one prefill (`REFILL_PATIENCE`). Where the runner's steps can carry prompts
(`engine.StaticStep.carry_prompts`), a short prompt admitted while other rows decode rides in the batch's next
steps instead, in place of its row's step, and nobody waits for a prefill (`PREFILL_STALL_STEPS`). One sequence is a
batch of one: `decoding.decode` runs here too.

Per-row state lives in arrays over the rows (`shape_choice.ChooserTable`, `row_arrays.RowArrays`), so that a step
whose shape drafts nothing on the host is chosen, laid out (`step.TokenRows`) and recorded without Python per row,
except for rows with a streamer or stopping criteria.

Plain steps, and steps that draft on the device, are pipelined where the runner can (`engine.StaticStep.chain`):
while the batch chooses such a shape next (the same one, or another, whose rows are then laid out afresh), the next
step is launched before the host reads the last one's outcome, so that reading, recording and the shape choice run
while the device computes. That choice is made
a step late, and a row that stops on an end-of-sequence token (or a cancel, or its max_new_tokens inside a step
that commits several tokens) has decoded one step more, which is thrown away; a row that reaches its
max_new_tokens with the step's one token is known to stop and is left out in time. (A step that verifies the
host's drafts is not followed this way: the choice before its drafts had chosen it, and nothing else is known
until its outcome is read.)
"""

from __future__ import annotations

import gc
import itertools
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch

from .device_drafts import ISOLATED
from .drafting.base import CandidateSource
from .drafting.confidence import Confidences
from .drafting.memory import DraftMemory
from .drafting.tree import EMPTY_TREE
from .sampling_params import SamplingParams, finite_real
from .row_arrays import RowArrays
from .shape_choice import BatchYield, ChooserTable, ShapeChooser, StepCosts, best_shape
from .state import Emitter, GenerationStats, SequenceState
from .step import DeviceBusy, PlannedStep, PromptPart, RowOutcomes, StepRunner, TokenRows
from .plan_cache import check_drift
from .tuning import COST_TIERS, StepPlan, cost_tier, shape_name

# How long free rows wait for company before the requests waiting for rows are prefilled into them, in batch steps:
# a refill's prefill costs about one step however many rows it starts (on a GPU a small forward is bound by its
# launches; `engine.StaticStep.prefill_rows`), while a free row loses one row's share of every step it waits. So
# free rows wait for the next row to free, at the rate rows have freed so far, while the row-steps they will have
# lost by then stay within one refill's cost, taken as one step of every row (as in ski rental, waiting never costs
# more than what it may save). They never wait when every waiting request fits now, when no row decodes, or when
# rows free too seldom to come within that cost (a few rows, long answers). 0: no wait. docs/benchmarks.md,
# "Refills that wait for company", has what it gains.
REFILL_PATIENCE = 1.0
# A prompt admitted while other rows decode rides in the batch's steps (which then take the runner's widest shape
# that carries prompts) where that costs less than its prefill: a prefill's chunk stalls every decoding row for about
# one and a half steps (docs/benchmarks.md, "The row tables on an H100, what a refill costs"), a carried prompt
# costs only its own row a step per step's rows of prompt (a 100-token prompt at 8 rows and 64 rows a step: 2
# row-steps, against 10 for its prefill). At most MAX_CARRIED_STEPS steps, for the request's first token waits for
# them. docs/algorithm.md, "Refilling free rows".
PREFILL_STALL_STEPS = 1.5
MAX_CARRIED_STEPS = 16


@dataclass
class Request:
    """One prompt to decode, and how it stops."""

    prompt: list[int]
    max_new_tokens: int
    eos_ids: set[int] = field(default_factory=set)
    stopping_criteria: Any = None  # transformers StoppingCriteriaList (or callable) applied to this row alone
    source: CandidateSource | None = None  # its own draft source (None: the scheduler's `make_source`)
    window_seed: int = 0  # the Jacobi window's initial guesses (they change how fast it goes, never its tokens)
    streamer: Any = None
    tag: Any = None  # the caller's name for the request, handed back with its result
    sampling: SamplingParams | None = None  # how it chooses its tokens, its seed included (None: greedy)
    lookahead: bool = True  # False: plain decoding for this request (the same tokens, one per step)
    # False: isolated. It neither drafts from the scheduler's DraftMemory nor adds its text to it, and a step that
    # drafts on the device starts it from blank tables of predictions (when it is admitted to an idle runner).
    # True without a memory: it shares the engine's own tables with the other requests without one.
    use_memory: bool = True


@dataclass
class Finished:
    """A request's result: its tokens (prompt + new) and its own statistics."""

    tag: Any
    tokens: list[int]
    stats: GenerationStats


@dataclass
class _Row:
    request: Request
    sequence: SequenceState
    admitted: float  # time.perf_counter() at admission


@dataclass
class _Pending:
    """A step launched and not read yet."""

    launched: Any  # the runner's `engine.LaunchedStep`
    admissions: numpy.ndarray  # the scheduler's `admissions` and `occupied` when it was launched: who held each row
    occupied: numpy.ndarray
    expected_extra: float  # the tokens beyond one per row that the rows expected of it when it was chosen
    prompts: dict[int, PromptPart] = field(default_factory=dict)  # by row, the prompt ids it carries


class BatchScheduler:
    """Admits requests into the free rows of `runner` between steps, decodes all rows with one step shape per
    step, retires rows whose sequence stopped. `stats` counts the batched forwards (steps) and every row's
    tokens (new_tokens; accepted_histogram: {tokens a row committed in a step: row-steps}).

    `make_source()` makes a row's draft source. With a `memory`, the rows of requests that use it draft from it
    too (their source is `make_source(memory)`), and every such request's text is added to it when it finishes.
    The rows share one `Confidences` of their drafts' confidences (the memory's, with a memory: it carries what
    earlier calls measured), except rows isolated from the memory, which share the scheduler's own. On a runner
    that drafts on the device, the rows of requests that use the memory copy from its text there too
    (`device_drafts.DeviceDrafter.mirror`); the others never read it. There the request admitted to an idle runner
    decides whose the device's tables are while it and the rows admitted beside it run: the memory's (with one that
    it uses), blank ones (an isolated request) or the engine's own (`DeviceDrafter.learn_for`).
    """

    def __init__(self, runner: StepRunner, plan: StepPlan, make_source: Callable[..., CandidateSource],
                 memory: DraftMemory | None = None, refill_patience: float = REFILL_PATIENCE) -> None:
        if tuple(layout.config for layout in runner.layouts) != plan.shapes:
            raise ValueError("the plan's shapes are not the runner's")
        if not finite_real(refill_patience) or refill_patience < 0:
            raise ValueError(f"refill_patience must be a finite number >= 0 (0: refill at once), got "
                             f"{refill_patience!r}")
        if memory is not None:
            memory.bind(runner.adapter.model)
        self.runner, self.plan, self.make_source, self.memory = runner, plan, make_source, memory
        self.confidences = Confidences()
        self.rows: list[_Row | None] = [None] * runner.batch_size
        # Per row, as arrays (a step that drafts nothing on the host then needs no Python per row): its shape
        # statistics (with whether it decodes with lookahead), its tokens, budget and stopping state, whether it
        # holds a request, how many requests it has held, the host's tree budget for it (0: it drafts nothing on the
        # host), and whether it has stopping criteria.
        batch, depth = runner.batch_size, max(shape.candidate_length for shape in plan.shapes)
        self.choosers = ChooserTable(plan.shapes, plan.costs_ms, batch)
        self.arrays = RowArrays(batch, len(plan.shapes), depth + 1)
        self.occupied = numpy.zeros(batch, dtype=bool)
        self.admissions = numpy.zeros(batch, dtype=numpy.int64)
        self.largest_tree = numpy.zeros(batch, dtype=numpy.int64)
        self.criteria = numpy.zeros(batch, dtype=bool)
        # Whether the runner takes a step of a shape that drafts nothing on the host as `TokenRows`.
        self._token_rows = getattr(runner, "takes_token_rows", False)
        self.waiting: deque[Request] = deque()
        # (See REFILL_PATIENCE.) The row-steps lost by free rows since the last admission; the rows freed so far.
        self.refill_patience, self._idle_row_steps, self._rows_freed = refill_patience, 0, 0
        self.stats = GenerationStats()  # steps: batched forwards; new_tokens: over all rows
        # One sequence: the calibrated costs and its chooser's estimates. A batch: the rows' summed estimates
        # corrected by what the batch's steps delivered, and, where a shape drafts on the host, costs measured as it
        # runs, host work per row included. A plan whose shapes draft nothing on the host (`auto` on CUDA: plain
        # steps and the device's trees) has no such work to measure and keeps its calibrated costs: its choices then
        # follow the rows' tokens alone, and two runs of one batch choose the same shapes (with measured wall times
        # they did not: docs/benchmarks.md, "Two runs of one batch alike"). Steps where no row samples, where rows
        # sample without a sort of the vocabulary, and where some row sorts it (top-k, top-p), apart: they cost apart
        # (`StepPlan.costs_for`).
        measured = runner.batch_size > 1 and any(shape.host_drafts for shape in plan.shapes)
        self.step_costs = {stages: StepCosts(plan.costs_for(stages), measured) for stages in COST_TIERS}
        self.batch_yield = BatchYield(len(plan.shapes)) if runner.batch_size > 1 else None
        self._steps_by_shape = [0] * len(plan.shapes)
        # The shapes whose steps can follow unread ones, if the runner pipelines; then the step launched and not
        # yet read.
        self._chainable = {index for index, shape in enumerate(plan.shapes) if shape.follows_on_device} \
            if getattr(runner, "pipelined", False) else set()
        self._pending: _Pending | None = None
        # The runner's widest shape whose steps carry prompts (None: it has none), and by row, the prompt ids its
        # next steps carry.
        carriers = getattr(runner, "prompt_carriers", ())
        self._carrier = max(carriers, key=lambda index: runner.layouts[index].size, default=None)
        self.carrying: dict[int, list[int]] = {}
        # Where the device computes while the host goes on, sources begin (index their prompts) only then.
        self._asynchronous = getattr(runner, "asynchronous", False)
        # A runner that drafts on the device: with a memory, it keeps a copy of the memory's text there.
        self._drafter = getattr(runner, "drafter", None)
        if self._drafter is not None and memory is not None:
            self._drafter.mirror(memory)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.occupied.any()

    @property
    def active(self) -> int:
        return int(self.occupied.sum())

    def submit(self, request: Request) -> None:
        """Queue `request`; one that cannot fit the runner is refused now, not when its row runs out of room."""
        if not request.prompt:
            raise ValueError(f"request {request.tag!r}: the prompt is empty")
        if request.sampling is not None and not request.sampling.is_plain_greedy \
                and getattr(self.runner, "sampler", None) is None:
            raise ValueError(f"request {request.tag!r} samples or has penalties, but this scheduler's step runner is "
                             "greedy; build it with sampling=True")
        room = getattr(self.runner, "max_length", None)
        total = len(request.prompt) + request.max_new_tokens
        if room is not None and total > room:
            raise ValueError(f"request {request.tag!r}: prompt ({len(request.prompt)} tokens) + max_new_tokens "
                             f"({request.max_new_tokens}) = {total} tokens does not fit this engine's max_length {room}")
        self.waiting.append(request)

    @property
    def costs(self) -> StepCosts:
        """The step costs that apply now, by the sampling stages the rows use (`tuning.cost_tier`)."""
        sampler = getattr(self.runner, "sampler", None)
        return self.step_costs[cost_tier(() if sampler is None else sampler.stages)]

    @property
    def steps_by_shape(self) -> dict[str, int]:
        """Batched steps run so far, by step shape (its name)."""
        return {shape_name(shape): n for shape, n in zip(self.plan.shapes, self._steps_by_shape) if n}

    @property
    def step_costs_ms(self) -> dict[str, float]:
        """What the shape choice takes a step of each shape (its name) to cost now, in ms: calibrated, or in a
        batch the median of its recent steps' wall times."""
        return {shape_name(shape): cost for shape, cost in zip(self.plan.shapes, self.costs.costs_ms)}

    @property
    def step_yields(self) -> dict[str, float]:
        """In a batch, per step shape, what its steps delivered beyond one token per row over what the rows
        expected (`BatchYield`); empty for one sequence."""
        if self.batch_yield is None:
            return {}
        return {shape_name(shape): ratio for shape, ratio in zip(self.plan.shapes, self.batch_yield.ratios)}

    def cancel(self, tag) -> Finished | None:
        """Stop the request tagged `tag`. A waiting one leaves the queue: its result (the prompt, no new tokens) is
        returned now. A decoding one frees its row at the next step, whose results include it with the tokens it
        has; None then, as for a tag that is neither waiting nor decoding."""
        for request in self.waiting:
            if request.tag == tag:
                self.waiting.remove(request)
                return Finished(tag, list(request.prompt), GenerationStats())
        for row in self.rows:
            if row is not None and row.request.tag == tag:
                row.sequence.emitter.done = True
        return None

    def run(self) -> Iterator[Finished]:
        """Step until every submitted request has finished; results in the order they finish.

        Python's cyclic garbage collector is off meanwhile: the sources' indexes hold many small objects, and
        every full collection walks all of them, which cost a third of the host time of a batched step. Decoding
        creates no reference cycles to collect; reference counting frees what it drops."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            while not self.idle:
                yield from self.step()
        finally:
            if collecting:
                gc.enable()

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Admit what fits, run one batched step (if any row decodes), retire what stopped. With a step pending,
        launch the next behind it if the batch goes on with a shape that drafts nothing on the host, then read and
        record it."""
        finished = self._admit()
        if self._pending is not None:
            return finished + self._step_behind()
        live = numpy.flatnonzero(self.occupied)
        if not len(live):
            return finished
        began = time.perf_counter()
        if self.carrying:  # the prompts ride in the widest carrier's rows; the other rows decode with it
            return finished + self._carry_step(live, began)
        # Drafting costs host time per row: skip it when the plain step wins even against full trees.
        shape, extra = self._choice_before_drafting(live)
        row_trees = None
        if self.plan.shapes[shape].host_drafts:
            row_trees = [self.rows[index].sequence.draft(begin=not self._asynchronous) for index in live]
            extra = self.choosers.batch_extra(live, [len(tree) for tree in row_trees], row_trees)
            shape = self._best(live, extra)
        drafted = self.plan.shapes[shape].host_drafts  # (then every row has drafted its tree)
        may_draft = [self.rows[index].sequence for index in live[self.largest_tree[live] > 0]]

        def use_device_time(device_busy: DeviceBusy) -> None:
            # The rows that drafted read their text at their next draft. Otherwise the sources catch up only while
            # the device computes: time the host would spend waiting (never on a synchronous device).
            if drafted:
                for sequence in may_draft:
                    sequence.observe_text()
            self._catch_up(may_draft, device_busy)

        overlap = use_device_time if may_draft else None
        if self._token_rows and not self.plan.shapes[shape].host_drafts:
            rows = TokenRows(self.arrays.last, self.occupied, self.occupied & self.choosers.lookahead,
                             self.arrays.length)
            if shape in self._chainable and self._may_chain(live):  # read at the next step, behind the one launched then
                self._pending = _Pending(self.runner.launch_rows(shape, rows, None), self.admissions.copy(),
                                         self.occupied.copy(), extra[shape])
                return finished
            outcomes = self.runner.step_rows(shape, rows, None, overlap=overlap)
            return finished + self._record_rows(shape, live, outcomes, extra[shape], began)
        row_trees = row_trees or [EMPTY_TREE] * len(live)
        steps: list = [None] * len(self.rows)
        histories: list = [None] * len(self.rows)
        for index, tree in zip(live, row_trees):
            sequence = self.rows[index].sequence
            steps[index] = sequence.plan_step(shape, tree, self.runner.layouts)
            histories[index] = sequence.history
        outcomes = self.runner.step_rows(shape, steps, histories, overlap=overlap)
        return finished + self._record_planned(shape, live, steps, outcomes, extra[shape], began)

    def _carry_step(self, live: numpy.ndarray, began: float) -> list[Finished]:
        """A step of the carrier shape in which the carrying rows take their prompts' next ids and the others
        decode; a prompt's last ids commit its sequence's first token, as its prefill would. Launched to be read
        at the next step where the runner pipelines."""
        shape = self._carrier
        decoding = live[~numpy.isin(live, list(self.carrying))]
        extra = self._choice_before_drafting(decoding)[1] if len(decoding) else numpy.zeros(len(self.plan.shapes))
        parts = self._prompt_parts()
        rows = TokenRows(self.arrays.last, self.occupied, self.occupied & self.choosers.lookahead, self.arrays.length,
                         parts)
        if shape in self._chainable and self._may_chain(live):  # read at the next step, behind the one launched then
            self._pending = _Pending(self.runner.launch_rows(shape, rows, None), self.admissions.copy(),
                                     self.occupied.copy(), extra[shape], parts)
            return []
        outcomes = self.runner.step_rows(shape, rows, None)
        self._record_prompt_ends(parts, outcomes, self.occupied)
        return self._record_rows(shape, decoding, outcomes, extra[shape], began)

    def _prompt_parts(self) -> dict[int, PromptPart]:
        """The ids each carrying row carries in the step about to be launched, taken off what it still carries (a
        row whose prompt's last ids go stops carrying)."""
        size = self.runner.layouts[self._carrier].size
        parts = {}
        for index, prompt in list(self.carrying.items()):
            parts[index] = PromptPart(prompt[:size], len(prompt) <= size)
            del prompt[:size]
            if not prompt:
                del self.carrying[index]
        return parts

    def _record_prompt_ends(self, parts: Mapping[int, PromptPart], outcomes: RowOutcomes,
                            unchanged: numpy.ndarray) -> None:
        """The first token of each row whose prompt's last ids the step carried (`parts`: the ids it carried, by
        row), as its prefill would hand it over (`unchanged`: by row, whether it still holds that request)."""
        for index, part in parts.items():
            if part.ends_prompt and unchanged[index]:
                outcome = outcomes[index]
                scores = None if outcome.scores is None else outcome.scores[:1]
                self.rows[index].sequence.record_prefill(outcome._replace(scores=scores))
                self.stats.new_tokens += 1

    def _choice_before_drafting(self, live: numpy.ndarray) -> tuple[int, numpy.ndarray]:
        """The shape for the rows `live` by what each expects of the fullest tree it may draft, and the tokens
        beyond one per row they expect of each shape."""
        extra = self.choosers.batch_extra(live, self.largest_tree[live])
        return self._best(live, extra), extra

    def _best(self, live: numpy.ndarray, extra) -> int:
        """The shape for the rows `live`, who expect `extra` of each shape now; the cheapest when none of them
        decodes with lookahead. (The costs measured so far cannot decide that: a shape's recent steps may have run
        with fewer rows than now, which made a wider shape look cheaper than the plain one.)"""
        if not self.choosers.lookahead[live].any():
            return 0
        yields = None if self.batch_yield is None else self.batch_yield.ratios
        return best_shape(len(live), extra, self.choosers.later(live).sum(axis=0), self.costs.costs_ms, yields)

    def _may_chain(self, live: numpy.ndarray) -> bool:
        """Whether the next step may be launched before this one is read: no row's stopping criteria need its
        logits (a later step replaces them on the device)."""
        return not self.criteria[live].any()

    def _step_behind(self) -> list[Finished]:
        """Launch the next step behind the pending one if the batch would choose its shape again, then read and
        record the pending step while the device computes."""
        began = time.perf_counter()
        pending, self._pending = self._pending, None
        shape = pending.launched.shape
        live = numpy.flatnonzero(self.occupied)
        if len(live) and self._may_chain(live):
            # The shape the batch chooses by the rows' statistics so far (those of the pending step are not in
            # them yet), launched behind the pending step where it needs nothing from the host.
            following, extra = self._choice_before_drafting(live)
            if self.carrying:  # prompts ride in the carrier's steps
                following = self._carrier
            if following in self._chainable:
                self._chain(pending, following, extra[following])
        self._catch_up([self.rows[index].sequence for index in live[self.largest_tree[live] > 0]],
                       pending.launched.busy)
        outcomes = self.runner.finish_rows(pending.launched)
        # Rows whose request changed since the launch decoded for the one before: their outcomes are not theirs.
        unchanged = self._unchanged(pending)
        self._record_prompt_ends(pending.prompts, outcomes, unchanged)
        decoded = numpy.flatnonzero(numpy.asarray(pending.launched.decoding, dtype=bool) & unchanged
                                    & ~self.arrays.done & (pending.launched.carried == 0))
        return self._record_rows(shape, decoded, outcomes, pending.expected_extra, began)

    def _unchanged(self, pending: _Pending) -> numpy.ndarray:
        """By row: whether it holds the same request as when `pending` was launched (and still decodes it)."""
        return (self.admissions == pending.admissions) & (self.occupied == pending.occupied) & self.occupied

    def _chain(self, pending: _Pending, shape: int, expected_extra: float) -> None:
        """Launch a step of `shape` behind `pending` for the rows that go on decoding after it (a row that stops in
        it on EOS, or on its budget within several tokens, decodes for nothing)."""
        launched = pending.launched
        unchanged = self._unchanged(pending)
        changes = {int(index): int(self.arrays.last[index]) if self.occupied[index] else None  # started or freed since
                   for index in numpy.flatnonzero(~unchanged & (self.occupied | pending.occupied))}
        # The pending step commits its last token, or it was cancelled (a row that still carries ids commits none).
        ending = unchanged & (self.arrays.done | (self.arrays.remaining == 1))
        ending[list(self.carrying)] = False
        changes.update((int(index), None) for index in numpy.flatnonzero(ending))
        decoding = numpy.array(launched.decoding, dtype=bool)
        for index, token in changes.items():
            decoding[index] = token is not None
        if not decoding.any():
            return
        parts = {}
        # Every row laid out afresh, as `step` lays them out, for another shape or where prompt ids ride.
        if shape != launched.shape or self.carrying or launched.carried.any():
            if not self._token_rows:
                return
            parts = self._prompt_parts() if self.carrying else {}
            rows = TokenRows(self.arrays.last, decoding, decoding & self.choosers.lookahead, self.arrays.length, parts)
            chained = self.runner.chain(launched, changes, shape, rows)
        elif self.plan.shapes[shape].device_drafts and any(
                token is not None and not self.choosers.lookahead[index] for index, token in changes.items()):
            return  # a row that starts without lookahead: launched from the host, with no tree
        else:
            chained = self.runner.chain(launched, changes)
        if shape == launched.shape:
            pending.launched = launched._replace(scores=None)  # the chained step writes its logits where these were
        self._pending = _Pending(chained, self.admissions.copy(), self.occupied.copy(), expected_extra, parts)

    @staticmethod
    def _catch_up(sequences: list[SequenceState], device_busy: DeviceBusy) -> None:
        """Begin the sources of rows that may draft and tell them of new text, while the device computes."""
        for sequence in sequences:
            if not device_busy():
                return
            sequence.catch_up()

    def _record_rows(self, shape: int, decoded: numpy.ndarray, outcomes: RowOutcomes, expected_extra: float,
                     began: float) -> list[Finished]:
        """Record a step of a shape that drafts nothing on the host: the rows without a streamer or stopping
        criteria all at once (`RowArrays.commit`, `ChooserTable.observe_rows`), the others one by one."""
        config = self.plan.shapes[shape]
        simple = self.arrays.simple[decoded]
        rows, accepted = decoded[simple], outcomes.packed[decoded[simple], 0]
        counts = self.arrays.commit(rows, shape, outcomes.packed[rows, 1 : 2 + config.candidate_length], accepted + 1)
        self.choosers.observe_rows(rows, shape, accepted)
        histogram = numpy.bincount(counts, minlength=config.candidate_length + 2)
        for index in decoded[~simple]:
            sequence = self.rows[index].sequence
            tree = sequence.device_tree(shape) if config.device_drafts else EMPTY_TREE
            histogram[sequence.record(PlannedStep(shape, [], tree), outcomes[index]).committed] += 1
        # Beyond one token per row (no tokens that only window n-grams drafted: the host drafted nothing).
        tokens = numpy.arange(len(histogram))
        extra_now = int((histogram[2:] * tokens[1:-1]).sum())
        return self._count(shape, {count: int(n) for count, n in enumerate(histogram) if n},
                           int((histogram * tokens).sum()), extra_now, expected_extra, began)

    def _record_planned(self, shape: int, live: numpy.ndarray, steps, outcomes, expected_extra: float,
                        began: float) -> list[Finished]:
        """Hand each row its outcome of a step laid out row by row."""
        has_window = self.plan.shapes[shape].has_window
        histogram, tokens, extra_now = Counter(), 0, 0
        for index in live:
            recorded = self.rows[index].sequence.record(steps[index], outcomes[index])
            histogram[recorded.committed] += 1
            tokens += recorded.committed
            # What the rows expected of the step now: beyond its one token, and for a window step apart from the
            # tokens only window n-grams drafted, which the window's later value stands for.
            extra_now += max(recorded.committed - 1 - has_window * recorded.window_credit, 0)
        return self._count(shape, histogram, tokens, extra_now, expected_extra, began)

    def _count(self, shape: int, histogram: Mapping[int, int], tokens: int, extra_now: int, expected_extra: float,
               began: float) -> list[Finished]:
        """Count the step (`histogram`: {tokens a row committed: rows}; `tokens`: all rows' tokens) and retire the
        rows that stopped."""
        if histogram:
            self.stats.steps += 1
            self._steps_by_shape[shape] += 1
            self.stats.new_tokens += tokens
            self.stats.accepted_histogram.update(histogram)
            self.costs.observe(shape, (time.perf_counter() - began) * 1e3)
            if self.batch_yield is not None:
                self.batch_yield.observe(shape, expected_extra, extra_now)  # what the rows expected before the step
        return self._retire()

    def _refills_now(self, free: int) -> bool:
        """Whether `free` rows take the waiting requests now, or wait for more rows to free (REFILL_PATIENCE); a wait
        adds this step's lost row-steps to the count since the last admission."""
        if free == len(self.rows) or free >= len(self.waiting) or not self._rows_freed:
            return True
        decoding = len(self.rows) - free - len(self.carrying)
        if all(self._carries(request.prompt, decoding) for request in itertools.islice(self.waiting, free)):
            return True  # no prefill to share
        self._idle_row_steps += free
        steps_to_next = self.stats.steps / self._rows_freed
        return self._idle_row_steps + free * steps_to_next >= self.refill_patience * len(self.rows)

    def _carries(self, prompt: Sequence[int], decoding: int) -> bool:
        """Whether a prompt admitted while `decoding` rows decode rides in the batch's steps (PREFILL_STALL_STEPS)."""
        if self._carrier is None:
            return False
        steps = -(-len(prompt) // self.runner.layouts[self._carrier].size)
        chunks = -(-len(prompt) // self.runner.prefill_chunk)
        return steps <= min(MAX_CARRIED_STEPS, PREFILL_STALL_STEPS * chunks * decoding)

    def _admit(self) -> list[Finished]:
        free = numpy.flatnonzero(~self.occupied).tolist()
        if not (free and self.waiting) or not self._refills_now(len(free)):
            return self._retire()
        self._idle_row_steps = 0
        idle = len(free) == len(self.rows)  # no row in flight: the first admitted decides what the tables hold
        admitted, finished = {}, []
        while free and self.waiting:
            request = self.waiting.popleft()
            index = free[0]
            emitter = Emitter(list(request.prompt), request.max_new_tokens, request.eos_ids,
                              request.stopping_criteria, request.streamer, self.runner.adapter.device, self.arrays,
                              index)
            confidences = self.confidences
            if request.source is not None:
                source = request.source
            elif self.memory is not None and request.use_memory:
                source, confidences = self.make_source(self.memory), self.memory.confidences
            else:
                source = self.make_source()
            sampled = request.sampling is not None and request.sampling.samples
            self.choosers.reset(index, request.lookahead)
            sequence = SequenceState(request.prompt, self.plan, source, emitter, random.Random(request.window_seed),
                                     request.lookahead, confidences, sampled, ShapeChooser.row_of(self.choosers, index))
            row = _Row(request, sequence, time.perf_counter())
            if sequence.done:  # max_new_tokens=0: nothing to decode, no row needed
                finished.append(self._result(row))
                continue
            free.pop(0)
            self.rows[index] = row
            self.occupied[index] = True
            self.admissions[index] += 1
            self.largest_tree[index] = sequence.largest_tree
            self.criteria[index] = request.stopping_criteria is not None
            admitted[index] = request.prompt
            if self._drafter is not None:
                uses_memory = self.memory is not None and request.use_memory
                if idle and len(admitted) == 1:
                    self._drafter.learn_for(self.memory if uses_memory else None if request.use_memory else ISOLATED)
                self._drafter.share_memory(index, uses_memory)
        decoding = int(self.occupied.sum()) - len(admitted) - len(self.carrying)
        carried = {index: prompt for index, prompt in admitted.items() if self._carries(prompt, decoding)}
        if carried:
            self.runner.carry_prompts(list(carried), {index: self.rows[index].request.sampling for index in carried})
            self.carrying.update((index, list(prompt)) for index, prompt in carried.items())
            self.stats.carried_prompts += len(carried)
        prefilled = {index: prompt for index, prompt in admitted.items() if index not in carried}
        if prefilled:
            self.stats.prefills += 1
            sampling = {index: self.rows[index].request.sampling for index in prefilled}
            for index, outcome in self.runner.prefill_rows(prefilled, sampling).items():
                self.rows[index].sequence.record_prefill(outcome)
                self.stats.new_tokens += 1
        return finished + self._retire()

    def _result(self, row: _Row) -> Finished:
        stats = row.sequence.finish(time.perf_counter() - row.admitted)
        if self.memory is not None and row.request.use_memory:
            self.memory.add(row.sequence.history)
            if self._drafter is not None:
                self._drafter.remember(self.memory, row.sequence.history)
        if row.request.streamer is not None:
            row.request.streamer.end()
        return Finished(row.request.tag, row.sequence.history, stats)

    def _retire(self) -> list[Finished]:
        finished = []
        retired = numpy.flatnonzero(self.occupied & self.arrays.done).tolist()
        self._rows_freed += len(retired)
        for index in retired:
            self.carrying.pop(index, None)  # (cancelled while its prompt rode in the steps)
            finished.append(self._result(self.rows[index]))
            self.rows[index] = None
            self.occupied[index] = False
        sampler = getattr(self.runner, "sampler", None)
        if retired and sampler is not None:  # steps stop paying for stages only the retired rows used
            sampler.end_rows(retired)
        if self._pending is not None and not self.occupied.any():
            self._pending = None  # it decodes for rows that have all stopped
        return finished

    def finish(self, seconds: float) -> GenerationStats:
        """The statistics of the whole run: batched forwards, new tokens over all rows, wall time."""
        self.stats.seconds = seconds
        for costs in self.step_costs.values():
            check_drift(self.plan, costs.calibrated_ms, costs.runs, costs.recent_ms)
        self.stats.shape_steps.update(self.steps_by_shape)
        return self.stats


def requests_from(prompts: Sequence[Sequence[int]], limits: Sequence[int], eos_ids: set[int], stopping_criteria,
                  window_seed: int, streamer=None, sampling: Sequence[SamplingParams | None] | None = None,
                  isolated: bool = False) -> list[Request]:
    """One request per prompt with its own max_new_tokens (`limits`) and sampling parameters (None: greedy),
    tagged with its index; `isolated`: each one isolated (`Request.use_memory`)."""
    sampling = sampling or [None] * len(prompts)
    return [Request(list(prompt), limit, eos_ids, stopping_criteria, None, window_seed, streamer, tag=index,
                    sampling=params, use_memory=not isolated)
            for index, (prompt, limit, params) in enumerate(zip(prompts, limits, sampling))]
