"""Choosing the step shape: before every step, the shape with the most expected committed tokens per millisecond.

A step of shape s commits 1 token, plus the accepted draft tokens when it verifies candidates, and, when it
runs the Jacobi window, feeds the pool with n-grams that later steps may accept. So its expected yield is

    1 + [verifies and the source has candidates] · a_s + [runs the window] · v

over its measured cost. a_s is the recent mean of accepted draft tokens of shape s when candidates were there.
One verified step tells what every other verifying shape would have accepted (a shape with fewer candidates gets
the accepted length if the winner is among its candidates, else nothing; one with more gets at least as much), so
every verifying shape learns from every step. v is the window's recent yield: draft tokens accepted from n-grams
that only the window had produced, per window step run. When nothing pays, the plain one-token step wins.
All statistics decay, so the choice follows the text as it changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import LookaheadConfig


@dataclass(frozen=True)
class AcceptancePrior:
    """Starting values of the statistics, as if `weight` steps had shown them."""

    accepted: float = 1.0  # draft tokens accepted per step that verifies candidates
    window_yield: float = 0.5  # draft tokens accepted from window n-grams per window step
    weight: float = 4.0


class ShapeChooser:
    def __init__(self, shapes: Sequence[LookaheadConfig], costs_ms: Sequence[float],
                 prior: AcceptancePrior = AcceptancePrior(), decay: float = 0.9) -> None:
        if len(shapes) != len(costs_ms) or not shapes:
            raise ValueError("ShapeChooser needs one cost per shape")
        if any(not cost > 0 for cost in costs_ms):
            raise ValueError(f"step costs must be positive, got {list(costs_ms)}")
        self.shapes, self.costs, self.decay = tuple(shapes), tuple(costs_ms), decay
        self.accepted = [prior.accepted] * len(shapes)
        self.window_credit = prior.window_yield * prior.weight
        self.window_steps = prior.weight
        self.chosen = [0] * len(shapes)

    @property
    def window_yield(self) -> float:
        return self.window_credit / self.window_steps if self.window_steps > 0 else 0.0

    def expected_tokens(self, shape: int, num_candidates: int) -> float:
        config = self.shapes[shape]
        tokens = 1.0
        if config.guesses > 0 and num_candidates > 0:
            tokens += self.accepted[shape]
        if config.has_window:
            tokens += self.window_yield
        return tokens

    def choose(self, num_candidates: int) -> int:
        """The shape for the next step, given how many candidates the source has for it."""
        rates = [self.expected_tokens(s, num_candidates) / cost for s, cost in enumerate(self.costs)]
        shape = max(range(len(rates)), key=rates.__getitem__)  # first best: shapes are listed cheapest first
        self.chosen[shape] += 1
        return shape

    def observe(self, shape: int, num_candidates: int, accepted: int, winner: int, window_credit: int) -> None:
        """After a step of `shape` verified `num_candidates` candidates and accepted `accepted` draft tokens of
        candidate `winner`; `window_credit` of them came from an n-gram only the window had produced."""
        decay = self.decay
        self.window_credit = self.window_credit * decay + window_credit
        self.window_steps = self.window_steps * decay + (1.0 if self.shapes[shape].has_window else 0.0)
        if num_candidates == 0:
            return
        for other, config in enumerate(self.shapes):
            if config.guesses == 0:
                continue
            # What `other` would have accepted with its own number of candidates (the best-ranked come first).
            would_accept = accepted if winner < config.guesses else 0
            self.accepted[other] = self.accepted[other] * decay + would_accept * (1 - decay)
