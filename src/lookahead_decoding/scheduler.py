"""Continuous batching: sequences decoded side by side in the rows of one step runner, each at its own pace.

    repeat:  admit waiting requests into free rows (one batched prefill) |
             every decoding row drafts its token tree (unless a plain step wins anyway) |
             choose one step shape for the batch |
             one fused forward for all rows | each row commits its own accepted tokens |
             retire the rows that stopped (their results are handed back; the rows are free again)

A row that stops mid-batch is refilled by the next request at the next step, without recapturing anything (the
runner's shapes do not depend on which rows decode). One sequence is a batch of one: `decoding.decode` runs
here too.

Plain steps, and steps that draft on the device, are pipelined where the runner can (`engine.StaticStep.chain`):
while the batch would choose the same such shape again, the next step is launched before the host reads the last
one's outcome, so that reading, recording and the shape choice run while the device computes. That choice is made
a step late, and a row that stops on an end-of-sequence token (or a cancel, or its max_new_tokens inside a step
that commits several tokens) has decoded one step more, which is thrown away; a row that reaches its
max_new_tokens with the step's one token is known to stop and is left out in time. (A step that verifies the
host's drafts is not followed this way: the choice before its drafts had chosen it, and nothing else is known
until its outcome is read.)
"""

from __future__ import annotations

import gc
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .drafting.base import CandidateSource
from .drafting.confidence import Confidences
from .drafting.memory import DraftMemory
from .drafting.tree import EMPTY_TREE
from .sampling_params import SamplingParams
from .shape_choice import BatchYield, StepCosts, batch_extra, choose_for_batch
from .state import Emitter, GenerationStats, SequenceState
from .step import DeviceBusy, PlannedStep, StepRunner
from .plan_cache import check_drift
from .tuning import StepPlan, shape_name


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
    # False: isolated from the scheduler's DraftMemory; it neither drafts from it nor adds its text to it.
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
    rows: list[_Row | None]  # who held each row when it was launched
    steps: list  # each row's PlannedStep (None: not decoding)
    expected_extra: float  # the tokens beyond one per row that the rows expected of it when it was chosen


class BatchScheduler:
    """Admits requests into the free rows of `runner` between steps, decodes all rows with one step shape per
    step, retires rows whose sequence stopped. `stats` counts the batched forwards (steps) and every row's
    tokens (new_tokens; accepted_histogram: {tokens a row committed in a step: row-steps}).

    `make_source()` makes a row's draft source. With a `memory`, the rows of requests that use it draft from it
    too (their source is `make_source(memory)`), and every such request's text is added to it when it finishes.
    The rows share one `Confidences` of their drafts' confidences (the memory's, with a memory: it carries what
    earlier calls measured), except rows isolated from the memory, which share the scheduler's own. On a runner
    that drafts on the device, the rows of requests that use the memory copy from its text there too
    (`device_drafts.DeviceDrafter.mirror`); the others never read it.
    """

    def __init__(self, runner: StepRunner, plan: StepPlan, make_source: Callable[..., CandidateSource],
                 memory: DraftMemory | None = None) -> None:
        if tuple(layout.config for layout in runner.layouts) != plan.shapes:
            raise ValueError("the plan's shapes are not the runner's")
        if memory is not None:
            memory.bind(runner.adapter.model)
        self.runner, self.plan, self.make_source, self.memory = runner, plan, make_source, memory
        self.confidences = Confidences()
        self.rows: list[_Row | None] = [None] * runner.batch_size
        self.waiting: deque[Request] = deque()
        self.stats = GenerationStats()  # steps: batched forwards; new_tokens: over all rows
        # One sequence: the calibrated costs and its chooser's estimates. A batch: costs measured as it runs, host
        # work per row included, and the rows' summed estimates corrected by what the batch's steps delivered.
        self.costs = StepCosts(plan.costs_ms, measured=runner.batch_size > 1)
        self.batch_yield = BatchYield(len(plan.shapes)) if runner.batch_size > 1 else None
        self._steps_by_shape = [0] * len(plan.shapes)
        # The shapes whose steps can follow unread ones, if the runner pipelines; then the step launched and not
        # yet read.
        self._chainable = {index for index, shape in enumerate(plan.shapes) if shape.follows_on_device} \
            if getattr(runner, "pipelined", False) else set()
        self._pending: _Pending | None = None
        # Where the device computes while the host goes on, sources begin (index their prompts) only then.
        self._asynchronous = getattr(runner, "asynchronous", False)
        # A runner that drafts on the device: with a memory, it keeps a copy of the memory's text there.
        self._drafter = getattr(runner, "drafter", None)
        if self._drafter is not None and memory is not None:
            self._drafter.mirror(memory)

    @property
    def idle(self) -> bool:
        return not self.waiting and all(row is None for row in self.rows)

    @property
    def active(self) -> int:
        return sum(row is not None for row in self.rows)

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
        """Admit what fits, run one batched step (if any row decodes), retire what stopped. With a plain step
        pending, launch the next behind it if the batch goes on with plain steps, then read and record it."""
        finished = self._admit()
        live = [(index, row) for index, row in enumerate(self.rows) if row is not None]
        if self._pending is not None:
            return finished + self._step_behind(live)
        if not live:
            return finished
        began = time.perf_counter()
        choosers = [row.sequence.chooser for _, row in live]
        costs = self.costs.costs_ms
        yields = None if self.batch_yield is None else self.batch_yield.ratios
        # Drafting costs host time per row: skip it when the plain step wins even against full trees.
        extra = batch_extra(choosers, [row.sequence.largest_tree for _, row in live])
        shape = choose_for_batch(choosers, extra, costs, yields)
        if self.plan.shapes[shape].host_drafts:
            row_trees = [row.sequence.draft(begin=not self._asynchronous) for _, row in live]
            extra = batch_extra(choosers, [len(tree) for tree in row_trees], row_trees)
            shape = choose_for_batch(choosers, extra, costs, yields)
        else:
            row_trees = [EMPTY_TREE] * len(live)
        steps: list = [None] * len(self.rows)
        histories: list = [None] * len(self.rows)
        for (index, row), tree in zip(live, row_trees):
            steps[index] = row.sequence.plan_step(shape, tree, self.runner.layouts)
            histories[index] = row.sequence.history
        if shape in self._chainable and self._may_chain(live):  # read at the next step, behind the one launched then
            self._pending = _Pending(self.runner.launch_rows(shape, steps, histories), list(self.rows), steps,
                                     extra[shape])
            return finished
        drafted = self.plan.shapes[shape].host_drafts
        may_draft = [row.sequence for _, row in live if row.sequence.largest_tree]

        def use_device_time(device_busy: DeviceBusy) -> None:
            # The rows that drafted read their text at their next draft. Otherwise the sources catch up only while
            # the device computes: time the host would spend waiting (never on a synchronous device).
            if drafted:
                for sequence in may_draft:
                    sequence.observe_text()
            self._catch_up(may_draft, device_busy)

        outcomes = self.runner.step_rows(shape, steps, histories, overlap=use_device_time if may_draft else None)
        return finished + self._record(shape, live, steps, outcomes, extra[shape], began)

    def _may_chain(self, live) -> bool:
        """Whether the next step may be launched before this one is read: no row's stopping criteria need its
        logits (a later step replaces them on the device)."""
        return all(row.request.stopping_criteria is None for _, row in live)

    def _step_behind(self, live) -> list[Finished]:
        """Launch the next step behind the pending one if the batch would choose its shape again, then read and
        record the pending step while the device computes."""
        began = time.perf_counter()
        pending, self._pending = self._pending, None
        shape = pending.launched.shape
        if live and self._may_chain(live):
            extra = self._same_next(live, shape)
            if extra is not None:
                self._chain(pending, extra)
        self._catch_up([row.sequence for _, row in live if row.sequence.largest_tree], pending.launched.busy)
        outcomes = self.runner.finish_rows(pending.launched)
        # Rows whose request changed since the launch decoded for the one before: their outcomes are not theirs.
        decoded = [(index, row) for index, row in enumerate(pending.rows)
                   if outcomes[index] is not None and self.rows[index] is row and not row.sequence.done]
        return self._record(shape, decoded, pending.steps, outcomes, pending.expected_extra, began)

    def _same_next(self, live, shape: int) -> float | None:
        """If the batch would choose `shape` again before drafting, by the rows' statistics so far (those of the
        pending step are not in them yet): the tokens beyond one per row they expect of it; else None."""
        choosers = [row.sequence.chooser for _, row in live]
        yields = None if self.batch_yield is None else self.batch_yield.ratios
        extra = batch_extra(choosers, [row.sequence.largest_tree for _, row in live])
        return extra[shape] if choose_for_batch(choosers, extra, self.costs.costs_ms, yields) == shape else None

    def _chain(self, pending: _Pending, expected_extra: float) -> None:
        """Launch a step of `pending`'s shape behind it for the rows that go on decoding after it (a row that
        stops in it on EOS, or on its budget within several tokens, decodes for nothing)."""
        shape, launched = pending.launched.shape, pending.launched
        changes = {}
        for index, row in enumerate(self.rows):
            if row is not pending.rows[index]:  # started or freed since
                changes[index] = None if row is None else row.sequence.history[-1]
            elif row is not None and (row.sequence.done or row.sequence.emitter.remaining == 1):
                changes[index] = None  # the pending step commits its last token, or it was cancelled
        decoding = [changes[index] is not None if index in changes else decodes
                    for index, decodes in enumerate(launched.decoding)]
        if not any(decoding):
            return
        if self.plan.shapes[shape].device_drafts and any(
                token is not None and not self.rows[index].sequence.device_tree(shape)
                for index, token in changes.items()):
            return  # a row that starts without lookahead: launched from the host, with no tree
        chained = self.runner.chain(launched, changes)
        # The step's input is on the device; the host keeps what recording needs: the row's tree (a template's).
        device_drafts = self.plan.shapes[shape].device_drafts
        steps = [PlannedStep(shape, [], row.sequence.device_tree(shape) if device_drafts else EMPTY_TREE)
                 if decodes else None for row, decodes in zip(self.rows, decoding)]
        self._pending = _Pending(chained, list(self.rows), steps, expected_extra)
        pending.launched = launched._replace(scores=None)  # the chained step writes its logits where these were

    @staticmethod
    def _catch_up(sequences: list[SequenceState], device_busy: DeviceBusy) -> None:
        """Begin the sources of rows that may draft and tell them of new text, while the device computes."""
        for sequence in sequences:
            if not device_busy():
                return
            sequence.catch_up()

    def _record(self, shape: int, live, steps, outcomes, expected_extra: float, began: float) -> list[Finished]:
        """Hand each row its outcome, count the step, and retire the rows that stopped."""
        if live:
            self.stats.steps += 1
            self._steps_by_shape[shape] += 1
        has_window = self.plan.shapes[shape].has_window
        step_tokens = extra_now = 0
        for index, row in live:
            recorded = row.sequence.record(steps[index], outcomes[index])
            step_tokens += recorded.committed
            self.stats.accepted_histogram[recorded.committed] += 1
            # What the rows expected of the step now: beyond its one token, and for a window step apart from the
            # tokens only window n-grams drafted, which the window's later value stands for.
            extra_now += max(recorded.committed - 1 - has_window * recorded.window_credit, 0)
        self.stats.new_tokens += step_tokens
        if live:
            self.costs.observe(shape, (time.perf_counter() - began) * 1e3)
            if self.batch_yield is not None:
                self.batch_yield.observe(shape, expected_extra, extra_now)  # what the rows expected before `record`
        return self._retire()

    def _admit(self) -> list[Finished]:
        free = [index for index, row in enumerate(self.rows) if row is None]
        admitted, finished = {}, []
        while free and self.waiting:
            request = self.waiting.popleft()
            emitter = Emitter(list(request.prompt), request.max_new_tokens, request.eos_ids,
                              request.stopping_criteria, request.streamer, self.runner.adapter.device)
            confidences = self.confidences
            if request.source is not None:
                source = request.source
            elif self.memory is not None and request.use_memory:
                source, confidences = self.make_source(self.memory), self.memory.confidences
            else:
                source = self.make_source()
            sampled = request.sampling is not None and request.sampling.samples
            sequence = SequenceState(request.prompt, self.plan, source, emitter, random.Random(request.window_seed),
                                     request.lookahead, confidences, sampled)
            row = _Row(request, sequence, time.perf_counter())
            if sequence.done:  # max_new_tokens=0: nothing to decode, no row needed
                finished.append(self._result(row))
                continue
            index = free.pop(0)
            self.rows[index] = row
            admitted[index] = request.prompt
            if self._drafter is not None:
                self._drafter.share_memory(index, self.memory is not None and request.use_memory)
        if admitted:
            sampling = {index: self.rows[index].request.sampling for index in admitted}
            for index, outcome in self.runner.prefill_rows(admitted, sampling).items():
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
        for index, row in enumerate(self.rows):
            if row is not None and row.sequence.done:
                finished.append(self._result(row))
                self.rows[index] = None
        if self._pending is not None and all(row is None for row in self.rows):
            self._pending = None  # it decodes for rows that have all stopped
        return finished

    def finish(self, seconds: float) -> GenerationStats:
        """The statistics of the whole run: batched forwards, new tokens over all rows, wall time."""
        self.stats.seconds = seconds
        check_drift(self.plan, self._steps_by_shape, self.costs.recent_ms)
        self.stats.shape_steps.update(self.steps_by_shape)
        return self.stats


def requests_from(prompts: Sequence[Sequence[int]], limits: Sequence[int], eos_ids: set[int], stopping_criteria,
                  window_seed: int, streamer=None, sampling: Sequence[SamplingParams | None] | None = None
                  ) -> list[Request]:
    """One request per prompt with its own max_new_tokens (`limits`) and sampling parameters (None: greedy),
    tagged with its index."""
    sampling = sampling or [None] * len(prompts)
    return [Request(list(prompt), limit, eos_ids, stopping_criteria, None, window_seed, streamer, tag=index,
                    sampling=params)
            for index, (prompt, limit, params) in enumerate(zip(prompts, limits, sampling))]
