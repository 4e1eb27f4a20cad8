"""One sequence being decoded: its committed tokens and stopping rule, its Jacobi windows, its draft source, its
shape statistics and its counters.

The decoding loop (`scheduler.py`) asks every sequence for its token tree, chooses one step shape for all of
them, has each lay out its part of the step, and hands each its outcome; everything per sequence lives here, so
that several sequences share one batched forward.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .device_drafts import TemplateShape, template_tree
from .drafting.base import CandidateSource
from .drafting.confidence import Confidences, evidence_of
from .drafting.pool import FROM_WINDOW
from .drafting.tree import EMPTY_TREE, TokenTree, build_tree
from .layout import StepLayout
from .row_arrays import RowArrays
from .shape_choice import PlainChooser, ShapeChooser
from .step import PlannedStep, StepOutcome
from .tuning import StepPlan, shape_name
from .window import JacobiWindow


@dataclass
class GenerationStats:
    """steps: forward passes after the prefill; accepted_histogram: {tokens committed in a step: steps};
    shape_steps: {step shape: steps of that shape}; prefills: the prefills that started sequences (a sequence's own:
    1; a batch's: the admissions that started rows together, each a forward per prompt chunk, apart from `steps`);
    carried_prompts: a batch's prompts that rode in its steps instead (`scheduler.PREFILL_STALL_STEPS`)."""

    steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    accepted_histogram: Counter = field(default_factory=Counter)
    shape_steps: Counter = field(default_factory=Counter)
    prefills: int = 0
    carried_prompts: int = 0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per forward pass after the prefill (the compression ratio)."""
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_second": self.tokens_per_second,
            "seconds": self.seconds,
            "accepted_histogram": {str(k): v for k, v in sorted(self.accepted_histogram.items())},
            "shape_steps": dict(self.shape_steps),
            "prefills": self.prefills,
            "carried_prompts": self.carried_prompts,
        }


class Emitter:
    """Appends committed tokens one at a time and decides, token by token, whether generation stops. Its state is
    row `row` of `arrays` (`row_arrays.RowArrays`, a table of its own by default), which steps that need no Python
    per row commit to directly."""

    def __init__(self, history: list[int], max_new_tokens: int, eos_ids: set[int], stopping_criteria, streamer, device,
                 arrays: RowArrays | None = None, row: int = 0):
        self.arrays, self.row = RowArrays(1) if arrays is None else arrays, row
        self.eos_ids = eos_ids
        self.stopping_criteria = stopping_criteria or None
        self.streamer = streamer
        self.device = device
        self.arrays.start(row, history, max_new_tokens, eos_ids, self.stopping_criteria is None and streamer is None)

    @property
    def history(self) -> list[int]:
        return self.arrays.flush(self.row)

    @property
    def remaining(self) -> int:
        return int(self.arrays.remaining[self.row])

    @property
    def done(self) -> bool:
        return bool(self.arrays.done[self.row])

    @done.setter
    def done(self, value: bool) -> None:
        self.arrays.done[self.row] = value

    def emit(self, tokens: Sequence[int], scores: torch.Tensor | None = None) -> int:
        """Commit tokens until one of them stops generation; returns how many were committed. scores[i] holds the
        logits that chose tokens[i]: stopping criteria get them as HF generate passes its scores, [1, V] float32,
        after every token (as HF generate checks them), with the ids so far: views of one copy of the history and
        the step's tokens, made once per step."""
        history, remaining = self.history, self.remaining
        committed = None
        if self.stopping_criteria is not None and tokens:
            committed = torch.tensor([[*history, *tokens]], device=self.device)
        count = 0
        for i, token in enumerate(tokens):
            history.append(token)
            remaining -= 1
            count += 1
            if self.streamer is not None:
                self.streamer.put(torch.tensor([token]))
            if remaining == 0 or token in self.eos_ids or self._criteria_met(committed, len(history), scores, i):
                self.done = True
                break
        self.arrays.remaining[self.row] = remaining
        if count:
            self.arrays.last[self.row], self.arrays.length[self.row] = history[-1], len(history)
        return count

    def _criteria_met(self, committed: torch.Tensor | None, length: int, scores: torch.Tensor | None,
                      index: int) -> bool:
        """Whether the stopping criteria stop after the step's token `index` (`committed`: [1, history + the
        step's tokens] ids, None without criteria; `length`: the history's length with that token)."""
        if committed is None:
            return False
        ids = committed[:, :length]
        token_scores = None if scores is None else scores[index : index + 1].float()
        return bool(self.stopping_criteria(ids, token_scores).any())


class Recorded(NamedTuple):
    """What one step did for a sequence: the tokens it committed, and how many of the draft tokens it accepted only
    n-grams of the Jacobi window had drafted (what earlier window steps were worth)."""

    committed: int
    window_credit: int


def only_from_window(keys) -> bool:
    """Whether a tree node's drafts (their confidence keys) were all n-grams that only the Jacobi window found."""
    return bool(keys) and all(evidence_of(k) == FROM_WINDOW for k in keys)


class SequenceState:
    """Drafting, shape choice and bookkeeping of one sequence; the forward runs elsewhere."""

    def __init__(self, prompt: Sequence[int], plan: StepPlan, source: CandidateSource, emitter: Emitter,
                 rng: random.Random, lookahead: bool = True, confidences: Confidences | None = None,
                 sampled: bool = False, chooser: ShapeChooser | None = None) -> None:
        """lookahead=False: the sequence never drafts and expects one token from every step (plain decoding, even
        in a step whose shape other rows use for lookahead). `confidences`: the drafts' confidences, learned from
        this sequence's verifications and (when shared) other sequences'; `sampled`: whether the sequence samples
        (sampled tokens match drafts less often, so their outcomes are counted apart). `chooser`: its shape
        statistics, a row of the batch's `ChooserTable` started for it (default: its own)."""
        self.plan, self.source, self.emitter = plan, source, emitter
        self.confidences, self.sampled = confidences, sampled
        shapes = plan.shapes
        self.draft_depth = next((shape.candidate_length for shape in shapes if shape.host_drafts), 1)  # K, shared
        # The host's drafts (0: it drafts none); shapes that draft on the device get their template's tree.
        self.largest_tree = max((shape.tree_nodes for shape in shapes if shape.host_drafts), default=0) \
            if lookahead else 0
        self.device_trees = [template_tree(TemplateShape.of(shape)) if shape.device_drafts and lookahead else None
                             for shape in shapes]
        # The host's Jacobi windows (a shape that drafts on the device keeps its window there).
        self.windows = [JacobiWindow(shape.window, shape.levels, rng) if shape.has_window and not shape.device_drafts
                        else None for shape in shapes]
        if chooser is None:
            chooser = ShapeChooser(shapes, plan.costs_ms) if lookahead else PlainChooser(shapes, plan.costs_ms)
        self.chooser = chooser
        self.stats = GenerationStats()
        self.steps_by_shape = [0] * len(shapes)
        self.prompt_length = len(prompt)
        # Tokens of the history the source has been told of; None until it begins from the prompt (`catch_up`).
        self.observed: int | None = None
        for window in filter(None, self.windows):
            window.begin(prompt)

    @property
    def history(self) -> list[int]:
        return self.emitter.history

    @property
    def done(self) -> bool:
        return self.emitter.done

    def observe_text(self) -> None:
        """Tell the source of the tokens committed since it was last told. The loop runs this while the device
        computes a drafting step (it does not depend on that step), so the text the source indexes is behind the
        history it drafts from by the steps since the last drafting step; the step's own data (window n-grams,
        predictions) reach it at once. A source that has not begun is told nothing: see `catch_up`."""
        if self.observed is None:
            return
        new = len(self.history) - self.observed
        if new:
            self.source.observe(self.history, new)
            self.observed = len(self.history)

    def catch_up(self) -> None:
        """Begin the source (from the prompt) if this sequence may draft, and tell it of everything committed
        since. The loop runs this only while the device would leave the host waiting: otherwise a sequence's
        source begins at its first draft, and one decoded with plain steps only never indexes its prompt."""
        if self.largest_tree:
            self._begin_source()
            self.observe_text()

    def _begin_source(self) -> None:
        if self.observed is None:
            self.source.begin(self.history[: self.prompt_length])
            self.observed = self.prompt_length

    def record_prefill(self, outcome: StepOutcome) -> None:
        self.stats.prefills += 1
        self.emitter.emit(outcome.committed, outcome.scores)

    def draft(self, begin: bool = True) -> TokenTree:
        """The token tree of drafts for the next step, as large as the plan's largest shape verifies. begin=False:
        a source that has not begun yet proposes nothing now (indexing a prompt would hold up the step); it begins
        while the device computes (`catch_up`)."""
        if self.largest_tree == 0 or (not begin and self.observed is None):
            return EMPTY_TREE
        self._begin_source()
        drafts = self.source.propose(self.history, self.draft_depth, self.largest_tree)
        return build_tree(drafts, self.largest_tree, self.draft_depth, self.confidences,
                          (self.sampled, self.chooser.in_run))

    def device_tree(self, shape: int) -> TokenTree:
        """The tree a step of `shape`, which drafts on the device, verifies for this sequence: the shape's template,
        or none for a sequence decoded without lookahead."""
        template = self.device_trees[shape]
        return EMPTY_TREE if template is None else template

    def plan_step(self, shape: int, tree: TokenTree, layouts: Sequence[StepLayout]) -> PlannedStep:
        """Lay out the step's input for `shape`: the current token, the shape's window and the tree cut to its
        budget (for a shape that drafts on the device, its template's tree, whose tokens the device drafts)."""
        current = self.history[-1]
        config, window = self.plan.shapes[shape], self.windows[shape]
        if config.device_drafts:  # the window's and the tree's tokens are the device's
            ids = layouts[shape].input_ids(current, [current] * (layouts[shape].lookahead_size - 1),
                                           [current] * config.tree_nodes)
            return PlannedStep(shape, ids, self.device_tree(shape))
        tree = tree.truncated(config.tree_nodes)
        padding = [current] * (config.tree_nodes - len(tree))
        ids = layouts[shape].input_ids(current, window.tokens() if window else [], [*tree.tokens, *padding])
        return PlannedStep(shape, ids, tree)

    def record(self, step: PlannedStep, outcome: StepOutcome) -> Recorded:
        """Learn from the step and commit its tokens (up to where generation stops)."""
        current = self.history[-1]
        tree, path = step.tree, outcome.path
        if tree.keys and self.confidences is not None:
            accepted = set(path)
            for node in tree.tested(path):
                for node_key in tree.keys[node]:
                    self.confidences.record(node_key, node in accepted)
        # Accepted tokens that only the window's n-grams drafted: what the window steps before were worth.
        window_credit = sum(only_from_window(tree.keys[node]) for node in path) if tree.keys else 0
        self.chooser.observe(step.shape, len(tree), path, window_credit)
        window = self.windows[step.shape]
        if window:
            self.source.observe_window(window.advance(current, outcome.new_level))
        if outcome.predictions is not None:
            self.source.observe_predictions(outcome.predictions)
        num_new = self.emitter.emit(outcome.committed, outcome.scores)
        self.stats.steps += 1
        self.stats.accepted_histogram[num_new] += 1
        self.steps_by_shape[step.shape] += 1
        return Recorded(num_new, window_credit)

    def finish(self, seconds: float) -> GenerationStats:
        """The sequence's statistics: the steps recorded here and those its row's arrays counted."""
        arrays, row = self.emitter.arrays, self.emitter.row
        self.stats.seconds = seconds
        self.stats.new_tokens = len(self.history) - self.prompt_length
        self.stats.steps += int(arrays.steps[row])
        self.stats.accepted_histogram.update({count: int(n) for count, n in enumerate(arrays.committed_steps[row])
                                              if n})
        steps_by_shape = [mine + int(counted) for mine, counted in zip(self.steps_by_shape, arrays.shape_steps[row])]
        self.stats.shape_steps.update({shape_name(shape): n for shape, n in zip(self.plan.shapes, steps_by_shape) if n})
        return self.stats
