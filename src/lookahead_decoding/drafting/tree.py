"""The token tree: the drafts of every source merged into one tree, best nodes first, under a node budget.

Drafts that share a prefix share its nodes, so a guess is verified once however many drafts make it. A node's
score is its path's estimated acceptance probability: the product of the per-token probabilities along the best
draft through it. That score never grows along a path, so the `budget` best nodes form a tree (every node's
parent is among them), and listing them best first puts every parent before its children. A prefix of the node
list is therefore the best tree of that smaller budget, which lets step shapes of different sizes share one tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import Draft

ROOT = -1  # the parent of the nodes that follow the current token directly


@dataclass(frozen=True)
class TokenTree:
    """Nodes best first; a node's token guesses the position after its parent (the current token for ROOT)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # index of each node's parent node, or ROOT
    scores: tuple[float, ...]  # each node's estimated probability of being accepted

    def __len__(self) -> int:
        return len(self.tokens)

    def truncated(self, budget: int) -> "TokenTree":
        """The best `budget` nodes (still a tree: parents come first)."""
        return TokenTree(self.tokens[:budget], self.parents[:budget], self.scores[:budget])

    def path(self, node: int) -> list[int]:
        """The nodes from depth 1 down to `node`."""
        nodes = []
        while node != ROOT:
            nodes.append(node)
            node = self.parents[node]
        return nodes[::-1]


EMPTY_TREE = TokenTree((), (), ())


def build_tree(drafts: Sequence[Draft], budget: int, max_length: int) -> TokenTree:
    """Merge `drafts` into a tree of at most `budget` nodes and depth `max_length`, best nodes first."""
    if budget <= 0 or not drafts:
        return EMPTY_TREE
    # Trie over all drafts: node key = (parent key, token); value = [score, depth, first seen].
    nodes: dict[tuple, list] = {}
    for draft in drafts:
        parent, probability = None, 1.0
        for depth, (token, p) in enumerate(zip(draft.tokens[:max_length], draft.probabilities), start=1):
            probability *= p
            key = (parent, token)
            node = nodes.get(key)
            if node is None:
                nodes[key] = [probability, depth, len(nodes)]
            elif probability > node[0]:
                node[0] = probability
            parent = key
    # Best first; a parent scores at least as high as its children and is shallower, so it sorts before them.
    best = sorted(nodes.items(), key=lambda item: (-item[1][0], item[1][1], item[1][2]))[:budget]
    index = {key: i for i, (key, _) in enumerate(best)}
    return TokenTree(
        tokens=tuple(key[1] for key, _ in best),
        parents=tuple(ROOT if key[0] is None else index[key[0]] for key, _ in best),
        scores=tuple(node[0] for _, node in best),
    )
