"""Candidate sources: where the guesses verified each step come from.

A source proposes continuations of the committed history, is told what was committed, and is handed the
n-grams the lookahead window produces. A new source is one subclass of `CandidateSource`; the decoding loop
does not care where candidates come from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from .ngram_pool import NGramPool


class CandidateSource(ABC):
    """Proposes guesses for the tokens that follow the last committed token."""

    @abstractmethod
    def begin(self, prompt: Sequence[int]) -> None:
        """Start a new generation for `prompt`."""

    @abstractmethod
    def propose(self, history: Sequence[int], limit: int) -> list[tuple[int, ...]]:
        """At most `limit` guesses for the tokens after history[-1], best first."""

    @abstractmethod
    def observe(self, history: Sequence[int], num_new: int) -> None:
        """The last `num_new` tokens of `history` were just committed."""

    def observe_window(self, ngrams: Sequence[tuple[int, tuple[int, ...]]]) -> None:
        """The lookahead window finished these n-grams, as (first token, rest); ignored unless a source wants them."""


class NGramPoolSource(CandidateSource):
    """Candidates looked up in an n-gram pool keyed by the last committed token.

    The pool holds the lookahead window's Jacobi trajectories and, with `from_text`, the n-grams of the prompt and
    of the committed output.
    """

    def __init__(self, pool: NGramPool, from_text: bool = True) -> None:
        self.pool = pool
        self.from_text = from_text

    def begin(self, prompt: Sequence[int]) -> None:
        if self.from_text:
            self.pool.add_ngrams(prompt)

    def propose(self, history: Sequence[int], limit: int) -> list[tuple[int, ...]]:
        return self.pool.lookup(history[-1])[:limit]

    def observe(self, history: Sequence[int], num_new: int) -> None:
        if self.from_text:
            # Only n-grams that end in a new token; earlier ones are already in the pool.
            n = self.pool.continuation_length + 1
            self.pool.add_ngrams(history, start=max(0, len(history) - num_new - n + 1))

    def observe_window(self, ngrams: Sequence[tuple[int, tuple[int, ...]]]) -> None:
        for key, continuation in ngrams:
            self.pool.add(key, continuation)
