"""The lookahead window: N-1 levels x W columns of guesses refined by one Jacobi iteration per step."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import chain


class JacobiWindow:
    """Level 0 holds columns 1..W-1 (column 0 is the current token); levels 1..N-2 hold W columns each.

    Level l, column c guesses the token at position t+l+c. Each step the model re-predicts the last level
    one position further; the window then shifts up one level and every column yields an n-gram
    (its row-0 token followed by its vertical trajectory).
    """

    def __init__(self, window: int, levels: int, rng: random.Random) -> None:
        self.window = window
        self.num_levels = levels
        self.rng = rng
        self.levels: list[list[int]] = []

    def begin(self, prompt: Sequence[int]) -> None:
        """Fill every level at once with tokens drawn from the prompt, so the first step already looks ahead.

        Random prompt tokens are the reference code's choice; Jacobi iteration converges from any start.
        """
        draw = lambda k: [self.rng.choice(prompt) for _ in range(k)]  # noqa: E731
        self.levels = [draw(self.window - 1)] + [draw(self.window) for _ in range(self.num_levels - 1)]

    def tokens(self) -> list[int]:
        """Window tokens in layout order (level 0 without the current token, then levels 1..N-2)."""
        return list(chain.from_iterable(self.levels))

    def advance(self, current: int, new_level: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
        """Record the model's predictions for the last level; return the W finished n-grams as (key, rest)."""
        upper = self.levels[1:]
        # Column c, top to bottom: its row-0 token, then its guesses on every level, then the new prediction.
        ngrams = [(column[0], column[1:]) for column in zip([current, *self.levels[0]], *upper, new_level)]
        shifted = [*upper, list(new_level)]
        self.levels = [shifted[0][1:], *shifted[1:]]
        return ngrams
