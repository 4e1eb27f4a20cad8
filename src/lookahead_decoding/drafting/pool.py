"""Drafts from the n-gram pool: the Jacobi window's trajectories and the text's own n-grams, keyed by one token."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .base import CandidateSource, Draft
from .ngram_pool import NGramPool

# The chance that a pooled guess is right before the pool's own agreement is counted, as priors: the first token
# after the key, and each later one given the earlier ones. Set by hand (a Jacobi guess keyed on one token is often
# wrong at its first token; once that one is right the rest usually follows); verification's outcomes take over
# as they come in (`confidence.py`), kept apart for n-grams only the window produced and those of the text.
FIRST_TOKEN_PROBABILITY = 0.5
NEXT_TOKEN_PROBABILITY = 0.8
FROM_WINDOW, FROM_TEXT = "pool: window", "pool: text"  # the drafts' evidence


class NGramPoolSource(CandidateSource):
    """Continuations looked up in an n-gram pool keyed by the last committed token.

    The pool holds the n-grams the lookahead window finishes and, with `from_text`, those of the prompt and of the
    committed output. A token's probability is its share among the pooled continuations that agree up to it,
    times the base chance above. A draft's evidence says whether only the window produced it.
    """

    def __init__(self, pool: NGramPool, from_text: bool = True) -> None:
        self.pool = pool
        self.from_text = from_text

    def begin(self, prompt: Sequence[int]) -> None:
        if self.from_text:
            self.pool.add_ngrams(prompt)

    def propose(self, history: Sequence[int], max_length: int, budget: int) -> list[Draft]:
        found = [(c[:max_length], from_window) for c, from_window in self.pool.lookup_origins(history[-1])]
        prefix_counts = Counter(c[:i] for c, _ in found for i in range(len(c) + 1))
        drafts = []
        for continuation, from_window in found:
            probabilities = tuple(
                prefix_counts[continuation[: i + 1]] / prefix_counts[continuation[:i]]
                * (FIRST_TOKEN_PROBABILITY if i == 0 else NEXT_TOKEN_PROBABILITY)
                for i in range(len(continuation))
            )
            drafts.append(Draft(continuation, probabilities, FROM_WINDOW if from_window else FROM_TEXT))
        return drafts

    def observe(self, history: Sequence[int], num_new: int) -> None:
        if self.from_text:
            # Only n-grams that end in a new token; earlier ones are already in the pool.
            n = self.pool.continuation_length + 1
            self.pool.add_ngrams(history, start=max(0, len(history) - num_new - n + 1))

    def observe_window(self, ngrams: Sequence[tuple[int, tuple[int, ...]]]) -> None:
        self.pool.add_all(ngrams, from_window=True)
