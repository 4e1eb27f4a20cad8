"""Drafts from recycled predictions: the model's latest top-k next tokens after each token (Token Recycling,
arXiv 2408.08696), taken from forwards that already ran and followed as a tree from the last committed token."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import NamedTuple

from .base import CandidateSource, Draft, ModelPredictions


EVIDENCE = "recycled"  # the drafts' evidence: the model's own softmax, which calibration corrects per bin


class _Node(NamedTuple):
    """One kept token of the draft tree."""

    parent: int  # index of the parent node; -1: the parent is the last committed token
    token: int
    probability: float  # the table's probability of `token` after the parent's token


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
        table, min_probability = self.table, self.min_probability
        nodes: list[_Node] = []  # the kept nodes, in the order they were kept
        # Candidates: (-path probability, order, parent node, rank of the token among the parent token's next
        # tokens, those next tokens and probabilities, the parent's path probability, depth). A table row lists
        # next tokens most likely first, so a token's next sibling is never likelier than it: the sibling becomes
        # a candidate only once the token is kept, and a node's first child once the node is kept.
        frontier: list[tuple] = []
        order = 0

        def offer(parent: int, rank: int, row: tuple[Sequence[int], Sequence[float]], path: float, depth: int) -> None:
            nonlocal order
            probability = path * row[1][rank]
            if probability >= min_probability:
                heapq.heappush(frontier, (-probability, order, parent, rank, row, path, depth))
                order += 1

        root_row = table.get(history[-1]) if max_length > 0 else None
        if root_row:
            offer(-1, 0, root_row, 1.0, 1)
        parents_of_kept: set[int] = set()
        # Path probabilities never grow down a path, so keeping the likeliest first keeps the `budget` likeliest.
        while frontier and len(nodes) < budget:
            negative, _, parent, rank, row, path, depth = heapq.heappop(frontier)
            token = row[0][rank]
            nodes.append(_Node(parent, token, row[1][rank]))
            parents_of_kept.add(parent)
            if rank + 1 < len(row[0]):
                offer(parent, rank + 1, row, path, depth)
            child_row = table.get(token) if depth < max_length else None
            if child_row:
                offer(len(nodes) - 1, 0, child_row, -negative, depth + 1)

        drafts = []
        for index in range(len(nodes)):  # in the order kept, so the drafts come out best first
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
