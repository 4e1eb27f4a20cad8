"""One request's sampling parameters, as an OpenAI-style request carries them, checked once.

The engine copies them into per-row tensors (`row_sampler.RowSampler`), so one batch mixes greedy rows, sampled
rows and rows with different parameters. Their meaning follows the usual conventions: the repetition penalty as HF
`generate` applies it (to every token of the prompt and output), presence and frequency penalties as the OpenAI
API defines them (on the output's tokens), then temperature, top-k, top-p and min-p, in HF `generate`'s order.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

SEED_LIMIT = 2**63  # seeds are int64 on the device


def finite_real(value) -> bool:
    """Whether `value` is a finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 decodes greedily (the warpers are then unused; the penalties still apply). top_k 0, top_p 1
    and min_p 0 are off; a repetition penalty of 1 and presence / frequency penalties of 0 are off. `seed` keys
    every random draw by (seed, position, token): the same seed gives the same tokens whatever else runs in the
    batch, and whether or not lookahead drafts anything (docs/algorithm.md, "Sampling as a seeded argmax")."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not finite_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not finite_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 disables it), got {self.top_p!r}")
        if not finite_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1] (0 disables it), got {self.min_p!r}")
        if not finite_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 disables it), got "
                             f"{self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not finite_real(value):
                raise ValueError(f"{name} must be a finite number (0 disables it), got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def samples(self) -> bool:
        return self.temperature > 0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no penalty: what the greedy engine does on its own."""
        return not self.samples and self.repetition_penalty == 1 and not self.presence_penalty \
            and not self.frequency_penalty
