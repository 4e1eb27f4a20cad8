"""Choosing the step shape: before every step, the shape with the most expected committed tokens per millisecond.

Expected committed tokens, per kind of shape:

* plain one-token step: 1;
* a step that only verifies drafts: 1 + the tokens its part of the token tree is expected to accept, from the
  tree's calibrated scores (`TokenTree.expected_accepted`) once the tree is drafted. Before that (deciding whether
  drafting is worth its host time at all): 1 + a_s, the recent mean of accepted draft tokens, kept apart for steps
  after a verification that accepted something and after one that did not (acceptance comes in runs). One verified
  step tells what every other verifying shape would have accepted (a smaller tree is a prefix of the node list, so
  it gets the part of the accepted path inside its budget; a larger one at least as much), so every verifying
  shape learns from every step;
* a step that drafts on the device: 1 + the recent mean of what its own steps accepted (kept apart in the same
  way), since the host never sees its tree. While other shapes run it drifts back to its prior, like a window
  shape's, so that a few steps that accepted nothing do not end the drafting for the rest of the sequence;
* a step that runs the Jacobi window: what its own steps committed now, plus what it commits later. Now: the recent
  mean of the tokens its steps committed, apart from those only window n-grams drafted. It starts from
  `expected_tokens`, a prior that grows with the step's rows, and while other shapes run it drifts back to that
  prior, so the window is retried now and then and measured again. Later: the window feeds the pool with n-grams
  that later steps verify; the tokens accepted from n-grams only the window produced (on any step), per window step
  run, are what a window step is worth later.

Each divided by the shape's measured cost. When nothing pays, the plain one-token step wins.

A batch sums its rows' estimates. Every row commits its one token from any shape; what the rows expect beyond
that, now, is scaled by what the shape's batched steps delivered beyond it (`BatchYield`); the window's later
value is added unscaled, since no step delivers it at once.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .config import LookaheadConfig
from .drafting.tree import TokenTree

# Tokens committed per lookahead step against its rows, 1 + 0.22·log2(1 + rows): a rough fit to the sweeps of
# docs/benchmarks.md across datasets and devices. It ranks shapes in calibration and is where a window's yield
# estimate starts; during decoding the measured yield takes over.
TOKENS_PER_LOG2_ROW = 0.22


def expected_tokens(config: LookaheadConfig) -> float:
    return 1.0 + TOKENS_PER_LOG2_ROW * math.log2(1 + config.tokens_per_step)


@dataclass(frozen=True)
class AcceptancePrior:
    """Starting values of the statistics."""

    accepted: float = 1.0  # draft tokens accepted per step that verifies candidates
    window_tokens: float | None = None  # tokens committed per window step; None: expected_tokens(shape)


class ShapeChooser:
    def __init__(self, shapes: Sequence[LookaheadConfig], costs_ms: Sequence[float],
                 prior: AcceptancePrior = AcceptancePrior(), decay: float = 0.9, window_decay: float = 0.8,
                 retry: float = 0.98, credit_decay: float = 0.95, min_window_rate: float = 0.05,
                 device_decay: float = 0.97, device_retry: float = 0.995) -> None:
        """decay: weight of the past in the acceptance means; window_decay: the same for the window's yield (it
        must learn fast: a short answer is over in a few dozen steps); retry: per step another shape runs, how
        much of a window shape's measured yield is kept (the rest moves back to the prior); credit_decay: weight
        of the past in the rates of window-drafted tokens accepted and of window steps run (pooled n-grams are
        verified over the following tens of steps); min_window_rate: the least window-step rate the later value
        is divided by, so that stale window n-grams still accepted while other shapes run make the window worth
        retrying, without dividing by nothing. device_decay and device_retry: `decay` and `retry` for a step that
        drafts on the device, both slower. A few misses say little of its next tree, which it drafts afresh from
        tables that every step keeps teaching (with 0.9, a replay of the H200's batch-1 plan took plain steps on
        a third of HumanEval's steps and lost 8% to the device step alone); where its tree finds nothing, it runs
        on about one step in ten."""
        if len(shapes) != len(costs_ms) or not shapes:
            raise ValueError("ShapeChooser needs one cost per shape")
        if any(not cost > 0 for cost in costs_ms):
            raise ValueError(f"step costs must be positive, got {list(costs_ms)}")
        self.shapes, self.costs = tuple(shapes), tuple(costs_ms)
        self.decay, self.window_decay, self.retry = decay, window_decay, retry
        self.device_decay, self.device_retry = device_decay, device_retry
        # [after a verification that accepted nothing, after one that accepted something][shape]
        self.accepted = [[prior.accepted] * len(shapes) for _ in range(2)]
        self.accepted_prior = prior.accepted
        self.in_run = False  # whether the last verification accepted something
        self.window_prior = [expected_tokens(shape) if prior.window_tokens is None else prior.window_tokens
                             for shape in shapes]
        self.window_tokens = list(self.window_prior)
        self.credit_decay, self.min_window_rate = credit_decay, min_window_rate
        self.window_credit = 0.0  # recent mean, over all steps, of tokens accepted that only window n-grams drafted
        self.window_rate = 0.0  # recent share of steps that ran a window
        # The shapes by kind, looked up on every step of every row.
        self.window_shapes = [i for i, shape in enumerate(self.shapes) if shape.has_window]
        self.verify_budgets = [(i, shape.tree_nodes) for i, shape in enumerate(self.shapes)
                               if shape.host_drafts and not shape.has_window]
        self.device_shapes = [i for i, shape in enumerate(self.shapes) if shape.device_drafts]
        self.refresh()

    def refresh(self) -> None:
        """Recompute the per-shape estimates that the batch's choice sums over rows (after the statistics
        change): `extra_before_draft`, the tokens beyond one each shape is expected to commit now, before the
        tree is drafted (with nodes to verify), and `later`, what each is expected to let later steps commit."""
        extra = [0.0] * len(self.shapes)
        later = [0.0] * len(self.shapes)
        value = self.window_value
        for shape in self.window_shapes:
            extra[shape] = self.window_tokens[shape] - 1.0
            later[shape] = value
        accepted = self.accepted[self.in_run]
        for shape, _ in self.verify_budgets:
            extra[shape] = accepted[shape]
        for shape in self.device_shapes:
            extra[shape] = accepted[shape]
        self.extra_before_draft, self.later = extra, later

    @property
    def window_value(self) -> float:
        """Tokens a window step is expected to commit later, through the n-grams it adds to the pool."""
        return self.window_credit / max(self.window_rate, self.min_window_rate)

    def extra_tokens(self, num_nodes: int, tree: TokenTree | None = None) -> list[float]:
        """Per shape, the tokens beyond one that a step of it is expected to commit itself, given a token tree of
        `num_nodes` nodes (`tree`: the tree itself, once drafted)."""
        if tree is None and num_nodes > 0:
            return self.extra_before_draft
        extra = list(self.extra_before_draft)
        for shape, budget in self.verify_budgets:
            extra[shape] = 0.0 if num_nodes == 0 else tree.expected_accepted(budget)
        return extra

    def choose(self, num_nodes: int, tree: TokenTree | None = None) -> int:
        """The shape for the next step, given how many nodes the token tree has (and the tree, once drafted)."""
        return choose_for_batch([self], batch_extra([self], [num_nodes], None if tree is None else [tree]))

    def observe(self, shape: int, num_nodes: int, path: Sequence[int], window_credit: int = 0) -> None:
        """After a step of `shape` verified a tree of `num_nodes` nodes and accepted the nodes `path`, of which
        `window_credit` only n-grams of the window had drafted."""
        accepted = len(path)
        kept = self.credit_decay
        ran_window = self.shapes[shape].has_window
        self.window_credit = self.window_credit * kept + window_credit * (1 - kept)
        self.window_rate = self.window_rate * kept + ran_window * (1 - kept)
        retry, tokens, prior = self.retry, self.window_tokens, self.window_prior
        for other in self.window_shapes:
            if other == shape:
                kept = self.window_decay
                now = 1 + accepted - window_credit  # the window's later value is counted apart
                tokens[other] = tokens[other] * kept + now * (1 - kept)
            else:
                tokens[other] = tokens[other] * retry + prior[other] * (1 - retry)
        if num_nodes > 0 and not self.shapes[shape].device_drafts:
            decay, accepted_now = self.decay, self.accepted[self.in_run]
            for other, budget in self.verify_budgets:
                # What `other` would have accepted with its own budget (its tree is a prefix of the node list).
                would_accept = sum(node < budget for node in path)
                accepted_now[other] = accepted_now[other] * decay + would_accept * (1 - decay)
            if self.shapes[shape].verifies:
                self.in_run = accepted > 0
        if self.shapes[shape].device_drafts:  # its own tree: what it accepted says nothing of the host's drafts
            for means in self.accepted:  # one mean: after a miss its tree is drafted afresh, unlike the host's
                means[shape] = means[shape] * self.device_decay + accepted * (1 - self.device_decay)
            self.in_run = accepted > 0
        for other in self.device_shapes:
            if other != shape:
                for means in self.accepted:
                    means[other] = means[other] * self.device_retry + self.accepted_prior * (1 - self.device_retry)
        self.refresh()


class PlainChooser(ShapeChooser):
    """The statistics of a sequence decoded without lookahead: one token from any step, nothing to learn."""

    def refresh(self) -> None:
        self.extra_before_draft = self.later = [0.0] * len(self.shapes)

    def extra_tokens(self, num_nodes: int, tree: TokenTree | None = None) -> list[float]:
        return self.extra_before_draft

    def observe(self, shape: int, num_nodes: int, path: Sequence[int], window_credit: int = 0) -> None:
        pass


def batch_extra(choosers: Sequence[ShapeChooser], num_nodes: Sequence[int],
                trees: Sequence[TokenTree] | None = None) -> list[float]:
    """Per shape, the tokens beyond one per row that a step of it is expected to commit now, summed over the rows,
    each by its own statistics and token tree of `num_nodes` (or the `trees` once drafted)."""
    trees = [None] * len(choosers) if trees is None else trees
    # Column sums of per-row lists: one call per row, not one per row and shape (this runs before every step).
    return [sum(column) for column in zip(*(chooser.extra_tokens(nodes, tree)
                                             for chooser, nodes, tree in zip(choosers, num_nodes, trees)))]


def choose_for_batch(choosers: Sequence[ShapeChooser], extra: Sequence[float], costs_ms: Sequence[float] | None = None,
                     yields: Sequence[float] | None = None) -> int:
    """The one shape for a step that decodes several sequences side by side: the most tokens expected over all
    of them per millisecond of the batched step (`costs_ms`: measured at this batch size; default: the choosers'
    own). A shape's tokens: one per row, plus what the rows expect beyond it now (`extra`, their `batch_extra`)
    scaled by the shape's `yields` (see `BatchYield`), plus the window's later value."""
    costs = choosers[0].costs if costs_ms is None else costs_ms
    yields = [1.0] * len(costs) if yields is None else yields
    later = map(sum, zip(*(chooser.later for chooser in choosers)))
    rows = len(choosers)
    rates = [(rows + shape_extra * shape_yield + shape_later) / cost
             for shape_extra, shape_later, shape_yield, cost in zip(extra, later, yields, costs)]
    return max(range(len(rates)), key=rates.__getitem__)  # first best: shapes are listed cheapest first


class BatchYield:
    """Per shape, the tokens beyond one per row that its batched steps committed (a window step's apart from those
    only window n-grams drafted, which the window's later value stands for), over those the rows' choosers
    expected of them now.

    Each chooser estimates for its own row. Summed over a batch, a bias that every row shares adds up: sampled
    rows accept fewer drafts than the greedy-shaped priors assume, and short runs of acceptance look longer than
    they are. The ratio corrects the batch's sum with what its steps delivered. Only the tokens beyond the one
    every step commits per row are compared (rows that draft nothing, or a plain step, tell nothing about drafts),
    and only what the rows expected now (a window's later value is not delivered by the step that earns it). A
    shape that is not chosen moves back to 1 (by `retry` per step), so a shape that lost is tried again now and
    then."""

    def __init__(self, shapes: int, decay: float = 0.8, retry: float = 0.98) -> None:
        self.ratios, self.decay, self.retry = [1.0] * shapes, decay, retry

    def observe(self, shape: int, expected_extra: float, committed_extra: int) -> None:
        for other in range(len(self.ratios)):
            if other != shape:
                self.ratios[other] = self.ratios[other] * self.retry + (1 - self.retry)
            elif expected_extra > 0:
                ratio = committed_extra / expected_extra
                self.ratios[other] = self.ratios[other] * self.decay + ratio * (1 - self.decay)


class StepCosts:
    """What a step of each shape costs (ms). Calibration measures the runner's step alone; in a batch the host's
    work grows with the rows (each drafts its tree, reads its outcome, feeds its sources) while the forward
    barely does, so with `measured` a shape's cost becomes the median wall time of its recent steps, host work
    included. A shape keeps its calibrated cost, which is lower than its wall time, until it has run
    `min_samples` steps, and the median ignores single slow steps: one slow first sample (a page fault, a
    collection, a noisy neighbour) must not switch a shape off for the rest of a run.

    A sample expires `max_age` steps (of any shape) after it was taken. A shape that stops being chosen is not
    measured again, so without expiry a cost measured during a burst (many rows starting at once; a busy host)
    would keep it off for good, even after the batch has changed. Once its samples have expired it is back at its
    calibrated cost, tried again, and measured afresh."""

    def __init__(self, calibrated_ms: Sequence[float], measured: bool, min_samples: int = 3,
                 recent: int = 15, max_age: int = 200) -> None:
        self.calibrated_ms = tuple(calibrated_ms)
        self.costs_ms = list(calibrated_ms)
        self.measured, self.min_samples, self.max_age = measured, min_samples, max_age
        self.steps = 0
        # Per shape: (step, ms) of its recent steps. Kept without `measured` too: `plan_cache.check_drift`
        # compares them with the calibrated costs.
        self.samples = [deque(maxlen=recent) for _ in self.costs_ms]

    @property
    def recent_ms(self) -> list[list[float]]:
        """Per shape, the wall times of its recent steps that have not expired."""
        return [[ms for _, ms in samples] for samples in self.samples]

    def observe(self, shape: int, wall_ms: float) -> None:
        self.steps += 1
        self.samples[shape].append((self.steps, wall_ms))
        for other, samples in enumerate(self.samples):
            expired = False
            while samples and samples[0][0] <= self.steps - self.max_age:
                samples.popleft()
                expired = True
            if self.measured and (expired or other == shape):
                self.costs_ms[other] = (statistics.median(ms for _, ms in samples) if len(samples) >= self.min_samples
                                        else self.calibrated_ms[other])
