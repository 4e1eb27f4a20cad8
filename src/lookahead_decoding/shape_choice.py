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
  run, are what a window step is worth later. A sequence decoded alone runs the window on its first steps whatever
  the prior says (until then it is valued at the most a step can commit): the prior is a rough fit across texts,
  and a window that is never run is never measured (with one thread on a 2-core CPU the prior ruled out a window
  step that gave 1.21x on HumanEval).

Each divided by the shape's measured cost. When nothing pays, the plain one-token step wins.

A batch sums its rows' estimates, which are held as arrays over its rows (`ChooserTable`). Every row commits its one token from any shape; what the rows expect beyond
that, now, is scaled by what the shape's batched steps delivered beyond it (`BatchYield`); the window's later
value is added unscaled, since no step delivers it at once.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy

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


class ChooserTable:
    """The shape statistics of every row of a batch, as arrays (row r of each is row r's), so that choosing a
    batch's shape, and learning from a step that drafted nothing on the host, are a few array operations whatever
    the number of rows. `ShapeChooser` is one row's view."""

    def __init__(self, shapes: Sequence[LookaheadConfig], costs_ms: Sequence[float], rows: int = 1,
                 prior: AcceptancePrior = AcceptancePrior(), decay: float = 0.9, window_decay: float = 0.8,
                 retry: float = 0.98, credit_decay: float = 0.95, min_window_rate: float = 0.05,
                 device_decay: float = 0.97, device_retry: float = 0.995, window_probes: int | None = None) -> None:
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
        on about one step in ten. window_probes: the window steps a sequence runs before its estimate may rule the
        window out; default 2 for one sequence, none in a batch, where one row's probe would widen every row's
        step."""
        if len(shapes) != len(costs_ms) or not shapes:
            raise ValueError("ShapeChooser needs one cost per shape")
        if any(not cost > 0 for cost in costs_ms):
            raise ValueError(f"step costs must be positive, got {list(costs_ms)}")
        self.shapes, self.costs = tuple(shapes), tuple(costs_ms)
        self.decay, self.window_decay, self.retry = decay, window_decay, retry
        self.device_decay, self.device_retry = device_decay, device_retry
        self.credit_decay, self.min_window_rate = credit_decay, min_window_rate
        self.accepted_prior = prior.accepted
        self.window_probes = (2 if rows == 1 else 0) if window_probes is None else window_probes
        self.window_prior = numpy.array([expected_tokens(shape) if prior.window_tokens is None else prior.window_tokens
                                         for shape in shapes])
        # The shapes by kind.
        self.window_shapes = [i for i, shape in enumerate(self.shapes) if shape.has_window]
        self.verify_budgets = [(i, shape.tree_nodes) for i, shape in enumerate(self.shapes)
                               if shape.host_drafts and not shape.has_window]
        self.device_shapes = [i for i, shape in enumerate(self.shapes) if shape.device_drafts]
        self.is_window = numpy.array([shape.has_window for shape in self.shapes])
        # What a window step commits when every draft is accepted: its value until it has been measured.
        self.window_most = numpy.array([1.0 + shape.candidate_length for shape in self.shapes])[self.is_window]
        self.is_verify = numpy.isin(numpy.arange(len(shapes)), [shape for shape, _ in self.verify_budgets])
        self.drafts = self.is_verify | numpy.array([shape.device_drafts for shape in self.shapes])
        # Per row: [after a verification that accepted nothing, after one that accepted something][row][shape]
        self.accepted = numpy.empty((2, rows, len(shapes)))
        self.in_run = numpy.zeros(rows, dtype=bool)  # whether the row's last verification accepted something
        self.window_tokens = numpy.empty((rows, len(shapes)))
        self.window_credit = numpy.zeros(rows)  # recent mean, over all steps, of tokens accepted that only window
        self.window_rate = numpy.zeros(rows)  # n-grams drafted; recent share of steps that ran a window
        self.window_runs = numpy.zeros(rows, dtype=int)  # window steps run in the row's sequence
        self.lookahead = numpy.ones(rows, dtype=bool)  # False: the row decodes plainly, one token from any step
        for row in range(rows):
            self.reset(row)

    def reset(self, row: int, lookahead: bool = True) -> None:
        """Start `row`'s statistics afresh, for a sequence decoded with or without lookahead."""
        self.accepted[:, row] = self.accepted_prior
        self.in_run[row] = False
        self.window_tokens[row] = self.window_prior
        self.window_credit[row] = self.window_rate[row] = 0.0
        self.window_runs[row] = 0
        self.lookahead[row] = lookahead

    def extra_before_draft(self, rows: numpy.ndarray) -> numpy.ndarray:
        """[rows, shapes]: the tokens beyond one a step of each shape is expected to commit now for each of
        `rows`, before its tree is drafted (given it has nodes to verify)."""
        extra = numpy.zeros((len(rows), len(self.shapes)))
        extra[:, self.is_window] = self.window_tokens[rows][:, self.is_window] - 1.0
        accepted = self.accepted[self.in_run[rows].astype(int), rows]
        extra[:, self.drafts] = accepted[:, self.drafts]
        extra[~self.lookahead[rows]] = 0.0
        return extra

    def later(self, rows: numpy.ndarray) -> numpy.ndarray:
        """[rows, shapes]: the tokens a step of each shape is expected to let later steps commit, for each of
        `rows`: a window step's, through the n-grams it adds to the pool; and, until the row has run the window
        `window_probes` times, what measuring it may show: up to the most a step can commit."""
        value = self.window_credit[rows] / numpy.maximum(self.window_rate[rows], self.min_window_rate)
        later = numpy.zeros((len(rows), len(self.shapes)))
        later[:, self.is_window] = value[:, None]
        unmeasured = self.window_runs[rows] < self.window_probes if self.window_probes else None
        if unmeasured is not None and unmeasured.any():
            probing = numpy.ix_(unmeasured, self.is_window)
            later[probing] = numpy.maximum(later[probing], self.window_most
                                           - self.window_tokens[rows[unmeasured]][:, self.is_window])
        later[~self.lookahead[rows]] = 0.0
        return later

    def batch_extra(self, rows: numpy.ndarray, num_nodes: numpy.ndarray, trees: Sequence[TokenTree] | None = None
                    ) -> numpy.ndarray:
        """Per shape, the tokens beyond one per row that a step of it is expected to commit now, summed over
        `rows`, each by its own statistics and token tree of `num_nodes` nodes (or its tree in `trees`, once
        drafted: a verify step's expectation is then the tree's own)."""
        extra = self.extra_before_draft(rows)
        if trees is None:
            extra[numpy.ix_(numpy.asarray(num_nodes) == 0, self.is_verify)] = 0.0
        else:
            for index, (row, nodes, tree) in enumerate(zip(rows, num_nodes, trees)):
                if self.lookahead[row]:
                    for shape, budget in self.verify_budgets:
                        extra[index, shape] = tree.expected_accepted(budget) if nodes else 0.0
        return extra.sum(axis=0)

    def observe(self, row: int, shape: int, num_nodes: int, path: Sequence[int], window_credit: int = 0) -> None:
        """After a step of `shape` verified a tree of `num_nodes` nodes for `row` and accepted the nodes `path`, of
        which `window_credit` only n-grams of the window had drafted."""
        if not self.lookahead[row]:
            return
        accepted, config = len(path), self.shapes[shape]
        kept = self.credit_decay
        self.window_credit[row] = self.window_credit[row] * kept + window_credit * (1 - kept)
        self.window_rate[row] = self.window_rate[row] * kept + config.has_window * (1 - kept)
        self.window_runs[row] += config.has_window
        retry, tokens, prior = self.retry, self.window_tokens[row], self.window_prior
        for other in self.window_shapes:
            if other == shape:
                kept = self.window_decay
                now = 1 + accepted - window_credit  # the window's later value is counted apart
                tokens[other] = tokens[other] * kept + now * (1 - kept)
            else:
                tokens[other] = tokens[other] * retry + prior[other] * (1 - retry)
        if num_nodes > 0 and not config.device_drafts:
            decay, accepted_now = self.decay, self.accepted[int(self.in_run[row]), row]
            for other, budget in self.verify_budgets:
                # What `other` would have accepted with its own budget (its tree is a prefix of the node list).
                would_accept = sum(node < budget for node in path)
                accepted_now[other] = accepted_now[other] * decay + would_accept * (1 - decay)
            if config.verifies:
                self.in_run[row] = accepted > 0
        self._observe_device(numpy.array([row]), shape, numpy.array([accepted]))

    def observe_rows(self, rows: numpy.ndarray, shape: int, accepted: numpy.ndarray) -> None:
        """`observe` for every row of `rows` at once, after a step of `shape`, a shape that drafts nothing on the
        host (plain, or drafting on the device: no window n-grams of the host to credit), which accepted
        `accepted[i]` draft tokens for rows[i]."""
        if self.shapes[shape].host_drafts:
            raise ValueError(f"observe_rows takes steps that draft nothing on the host, not {self.shapes[shape]}")
        keep = self.lookahead[rows]
        rows, accepted = rows[keep], accepted[keep]
        kept = self.credit_decay
        self.window_credit[rows] *= kept
        self.window_rate[rows] = self.window_rate[rows] * kept + self.shapes[shape].has_window * (1 - kept)
        self.window_runs[rows] += self.shapes[shape].has_window
        for other in self.window_shapes:
            tokens = self.window_tokens[rows, other]
            if other == shape:
                now = 1 + accepted
                self.window_tokens[rows, other] = tokens * self.window_decay + now * (1 - self.window_decay)
            else:
                self.window_tokens[rows, other] = tokens * self.retry + self.window_prior[other] * (1 - self.retry)
        self._observe_device(rows, shape, accepted)

    def _observe_device(self, rows: numpy.ndarray, shape: int, accepted: numpy.ndarray) -> None:
        """A step that drafts on the device learns its own mean (one, hit or miss: after a miss its tree is drafted
        afresh, unlike the host's); the other shapes that do drift back to the prior."""
        if self.shapes[shape].device_drafts:  # its own tree: what it accepted says nothing of the host's drafts
            means = self.accepted[:, rows, shape]
            self.accepted[:, rows, shape] = means * self.device_decay + accepted * (1 - self.device_decay)
            self.in_run[rows] = accepted > 0
        for other in self.device_shapes:
            if other != shape:
                means = self.accepted[:, rows, other]
                self.accepted[:, rows, other] = means * self.device_retry + self.accepted_prior * (1 - self.device_retry)


class ShapeChooser:
    """One sequence's shape statistics: a row of a `ChooserTable`, by default a table of its own (see it for the
    arguments)."""

    def __init__(self, shapes: Sequence[LookaheadConfig], costs_ms: Sequence[float],
                 prior: AcceptancePrior = AcceptancePrior(), **rates: float) -> None:
        self.table, self.row = ChooserTable(shapes, costs_ms, 1, prior, **rates), 0

    @classmethod
    def row_of(cls, table: ChooserTable, row: int) -> "ShapeChooser":
        chooser = cls.__new__(cls)
        chooser.table, chooser.row = table, row
        return chooser

    @property
    def shapes(self) -> tuple[LookaheadConfig, ...]:
        return self.table.shapes

    @property
    def costs(self) -> tuple[float, ...]:
        return self.table.costs

    @property
    def in_run(self) -> bool:
        """Whether the last verification accepted something."""
        return bool(self.table.in_run[self.row])

    @property
    def accepted(self) -> list[list[float]]:
        """The recent means of accepted draft tokens per shape: [after a miss, after a hit][shape]."""
        return self.table.accepted[:, self.row].tolist()

    @property
    def window_tokens(self) -> numpy.ndarray:
        return self.table.window_tokens[self.row]

    @property
    def window_credit(self) -> float:
        return float(self.table.window_credit[self.row])

    @window_credit.setter
    def window_credit(self, value: float) -> None:
        self.table.window_credit[self.row] = value

    @property
    def window_rate(self) -> float:
        return float(self.table.window_rate[self.row])

    @window_rate.setter
    def window_rate(self, value: float) -> None:
        self.table.window_rate[self.row] = value

    @property
    def window_value(self) -> float:
        """Tokens a window step is expected to commit later, through the n-grams it adds to the pool."""
        return self.window_credit / max(self.window_rate, self.table.min_window_rate)

    def choose(self, num_nodes: int, tree: TokenTree | None = None) -> int:
        """The shape for the next step, given how many nodes the token tree has (and the tree, once drafted)."""
        rows = numpy.array([self.row])
        extra = self.table.batch_extra(rows, [num_nodes], None if tree is None else [tree])
        return best_shape(1, extra, self.table.later(rows)[0], self.costs)

    def observe(self, shape: int, num_nodes: int, path: Sequence[int], window_credit: int = 0) -> None:
        """After a step of `shape` verified a tree of `num_nodes` nodes and accepted the nodes `path`, of which
        `window_credit` only n-grams of the window had drafted."""
        self.table.observe(self.row, shape, num_nodes, path, window_credit)


class PlainChooser(ShapeChooser):
    """The statistics of a sequence decoded without lookahead: one token from any step, nothing to learn."""

    def __init__(self, shapes: Sequence[LookaheadConfig], costs_ms: Sequence[float]) -> None:
        super().__init__(shapes, costs_ms)
        self.table.reset(0, lookahead=False)


def best_shape(rows: int, extra: Sequence[float], later: Sequence[float], costs_ms: Sequence[float],
               yields: Sequence[float] | None = None) -> int:
    """The one shape for a step that decodes `rows` sequences side by side: the most tokens expected over all of
    them per millisecond of the batched step (`costs_ms`: measured at this batch size). A shape's tokens: one per
    row, plus what the rows expect beyond it now (`extra`: `ChooserTable.batch_extra`) scaled by the shape's
    `yields` (see `BatchYield`), plus what they expect it to let later steps commit (`later`, summed over rows)."""
    yields = [1.0] * len(costs_ms) if yields is None else yields
    rates = [(rows + shape_extra * shape_yield + shape_later) / cost
             for shape_extra, shape_later, shape_yield, cost in zip(extra, later, yields, costs_ms)]
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
        self.runs = [0] * len(self.costs_ms)  # steps of each shape
        # Per shape: (step, ms) of its recent steps. Kept without `measured` too: `plan_cache.check_drift`
        # compares them with the calibrated costs.
        self.samples = [deque(maxlen=recent) for _ in self.costs_ms]

    @property
    def recent_ms(self) -> list[list[float]]:
        """Per shape, the wall times of its recent steps that have not expired."""
        return [[ms for _, ms in samples] for samples in self.samples]

    def observe(self, shape: int, wall_ms: float) -> None:
        self.steps += 1
        self.runs[shape] += 1
        self.samples[shape].append((self.steps, wall_ms))
        for other, samples in enumerate(self.samples):
            expired = False
            while samples and samples[0][0] <= self.steps - self.max_age:
                samples.popleft()
                expired = True
            if self.measured and (expired or other == shape):
                self.costs_ms[other] = (statistics.median(ms for _, ms in samples) if len(samples) >= self.min_samples
                                        else self.calibrated_ms[other])
