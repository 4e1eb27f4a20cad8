"""The candidate-source interface: where the guesses verified each step come from.

A source proposes drafts for the tokens after the last committed token, each token with the source's estimate of
the probability that it is right given that the tokens before it are. It is told what was committed, and may ask
for what the step computed anyway: the n-grams the Jacobi window finished, and the model's top-k next tokens at
every row whose logits the step computed. The drafts of all sources are merged into one token tree (`tree.py`).
A new source is one subclass of `CandidateSource`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import NamedTuple


class Draft(NamedTuple):
    """A guess for the tokens at positions t+1, t+2, ... after the last committed token (position t)."""

    tokens: tuple[int, ...]
    # probabilities[i]: the source's estimate that tokens[i] is right, given that tokens[:i] are right.
    probabilities: tuple[float, ...]
    # What kind of guess this is (any hashable, e.g. a source's name and how long a match it found). Drafts with
    # evidence get their probabilities calibrated against what verification accepted (`confidence.py`), kept
    # apart per evidence; None: the probabilities are used as given.
    evidence: Hashable = None


class ModelPredictions(NamedTuple):
    """The model's most likely next tokens after each of `tokens`, as one forward computed them."""

    tokens: list[int]  # [R] input tokens whose next-token distribution the step computed
    top_tokens: list[list[int]]  # [R][k] most likely next tokens, most likely first
    top_probabilities: list[list[float]]  # [R][k] their probabilities (softmax of the raw logits)


class CandidateSource(ABC):
    """Proposes drafts for the tokens that follow the last committed token."""

    # The model's top-k next tokens this source wants at every computed row (0: none; computing them costs).
    predictions_wanted: int = 0

    def begin(self, prompt: Sequence[int]) -> None:
        """Start a new generation for `prompt`."""

    @abstractmethod
    def propose(self, history: Sequence[int], max_length: int, budget: int) -> list[Draft]:
        """Drafts for the tokens after history[-1], best first, each at most `max_length` tokens long.

        `budget` is how many tree nodes the step can verify: drafts beyond it are wasted work, not an error.
        """

    def observe(self, history: Sequence[int], num_new: int) -> None:
        """The last `num_new` tokens of `history` were committed since the last call (the decoding loop tells
        sources while the device runs its next drafting step, so this comes late by the steps in between)."""

    def observe_window(self, ngrams: Sequence[tuple[int, tuple[int, ...]]]) -> None:
        """The Jacobi window finished these n-grams, as (first token, rest)."""

    def observe_predictions(self, predictions: ModelPredictions) -> None:
        """The step computed these next-token predictions (only called when `predictions_wanted` > 0)."""


class CombinedSource(CandidateSource):
    """Several sources as one: each sees everything, and their drafts are pooled (the tree merges them)."""

    def __init__(self, sources: Sequence[CandidateSource]) -> None:
        if not sources:
            raise ValueError("CombinedSource needs at least one source")
        self.sources = tuple(sources)
        self.predictions_wanted = max(source.predictions_wanted for source in self.sources)

    def begin(self, prompt):
        for source in self.sources:
            source.begin(prompt)

    def propose(self, history, max_length, budget):
        return [draft for source in self.sources for draft in source.propose(history, max_length, budget)]

    def observe(self, history, num_new):
        for source in self.sources:
            source.observe(history, num_new)

    def observe_window(self, ngrams):
        for source in self.sources:
            source.observe_window(ngrams)

    def observe_predictions(self, predictions):
        for source in self.sources:
            if source.predictions_wanted:
                source.observe_predictions(predictions)


class NoDrafts(CandidateSource):
    """The source of a plan that verifies nothing: it proposes nothing and keeps nothing."""

    def propose(self, history, max_length, budget):
        return []
