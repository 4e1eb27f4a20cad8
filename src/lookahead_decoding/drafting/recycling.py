"""Drafts from recycled predictions: the model's latest top-k next tokens after each token (Token Recycling,
arXiv 2408.08696), taken from forwards that already ran and followed as a tree from the last committed token."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import NamedTuple

from .base import CandidateSource, Draft, ModelPredictions


EVIDENCE = "recycled"  # the drafts' evidence: the model's own softmax, which calibration corrects per bin


class _Node(NamedTuple):
    """One token of the draft tree."""

    parent: int  # index of the parent node; -1: the parent is the last committed token
    token: int
    probability: float  # the table's probability of `token` after the parent's token
    path_probability: float  # product of the probabilities from the root down to this node
    depth: int


class RecycledTopKSource(CandidateSource):
    """The model's most recent top-k next tokens after every token it has seen, expanded best-first into a tree.

    Each step reports the top `top_k` next tokens at every row it computed; the table keeps, per input token, only
    the latest report. With `keep_across_generations` (the default) the table outlives `begin`, so a new generation
    starts from what earlier ones saw of the same model; a source shared between models must turn it off.
    `table` shares the table with other sources: a DraftMemory's (`memory.recycled`), which carries it across
    requests and between the rows of a batch. Nodes whose path probability falls below `min_probability` are not
    drafted.
    """

    def __init__(self, top_k: int = 8, min_probability: float = 0.01, keep_across_generations: bool = True,
                 table: dict[int, tuple[Sequence[int], Sequence[float]]] | None = None) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if table is not None and not keep_across_generations:
            raise ValueError("a shared table is kept across generations: keep_across_generations=False would clear "
                             "it for every source that shares it")
        self.predictions_wanted = top_k
        self.min_probability = min_probability
        self.keep_across_generations = keep_across_generations
        # token -> (its latest top-k next tokens, most likely first; their probabilities), as reported
        self.table: dict[int, tuple[Sequence[int], Sequence[float]]] = {} if table is None else table

    def begin(self, prompt: Sequence[int]) -> None:
        if not self.keep_across_generations:
            self.table.clear()

    def observe_predictions(self, predictions: ModelPredictions) -> None:
        k = self.predictions_wanted
        tokens, top_tokens, top_probabilities = predictions
        if set(map(len, top_tokens)) == {k}:  # as runners report them: one C-level update, no row loop
            self.table.update(zip(tokens, zip(top_tokens, top_probabilities)))
        else:
            self.table.update((token, (next_tokens[:k], probabilities[:k]))
                              for token, next_tokens, probabilities in zip(*predictions))

    def propose(self, history: Sequence[int], max_length: int, budget: int) -> list[Draft]:
        nodes: list[_Node] = []
        frontier: list[tuple[float, int]] = []  # (-path probability, node index): heapq pops the likeliest first

        def push_children(parent: int, token: int, path_probability: float, depth: int) -> None:
            if depth >= max_length or token not in self.table:
                return
            for child_token, probability in zip(*self.table[token]):
                child_path_probability = path_probability * probability
                if child_path_probability >= self.min_probability:
                    heapq.heappush(frontier, (-child_path_probability, len(nodes)))
                    nodes.append(_Node(parent, child_token, probability, child_path_probability, depth + 1))

        push_children(-1, history[-1], 1.0, 0)
        kept: list[int] = []
        parents_of_kept: set[int] = set()
        # Path probabilities never grow down a path, so popping the likeliest first keeps the `budget` likeliest nodes.
        while frontier and len(kept) < budget:
            _, index = heapq.heappop(frontier)
            node = nodes[index]
            kept.append(index)
            parents_of_kept.add(node.parent)
            push_children(index, node.token, node.path_probability, node.depth)

        drafts = []
        for index in kept:  # in pop order, so the drafts come out best first
            if index in parents_of_kept:
                continue  # not a leaf: a longer draft covers it
            tokens: list[int] = []
            probabilities: list[float] = []
            while index >= 0:
                node = nodes[index]
                tokens.append(node.token)
                probabilities.append(node.probability)
                index = node.parent
            drafts.append(Draft(tuple(reversed(tokens)), tuple(reversed(probabilities)), EVIDENCE))
        return drafts
