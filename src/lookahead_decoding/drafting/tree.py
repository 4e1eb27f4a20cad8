"""The token tree: the drafts of every source merged into one tree, best nodes first, under a node budget.

Drafts that share a prefix share its nodes, so a guess is verified once however many drafts make it. A node's
score is its path's estimated acceptance probability: the product of the per-token probabilities along the best
draft through it. That score never grows along a path, so the `budget` best nodes form a tree (every node's
parent is among them), and listing them best first puts every parent before its children. A prefix of the node
list is therefore the best tree of that smaller budget, which lets step shapes of different sizes share one tree.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .base import Draft
from .confidence import Confidences, Key, key

ROOT = -1  # the parent of the nodes that follow the current token directly


@dataclass(frozen=True)
class TokenTree:
    """Nodes best first; a node's token guesses the position after its parent (the current token for ROOT)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # index of each node's parent node, or ROOT
    scores: tuple[float, ...]  # each node's estimated probability of being accepted
    # expected[b - 1]: the tokens verification is expected to accept from the first b nodes (see `build_tree`)
    expected: tuple[float, ...] = ()
    # keys[i]: the confidence keys of the drafts through node i, whose claims its verification tests
    keys: tuple[tuple[Key, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)

    def truncated(self, budget: int) -> "TokenTree":
        """The best `budget` nodes (still a tree: parents come first)."""
        return TokenTree(self.tokens[:budget], self.parents[:budget], self.scores[:budget], self.expected[:budget],
                         self.keys[:budget])

    def expected_accepted(self, budget: int) -> float:
        """Draft tokens the best `budget` nodes are expected to have accepted."""
        return self.expected[min(budget, len(self.expected)) - 1] if budget > 0 and self.expected else 0.0

    def path(self, node: int) -> list[int]:
        """The nodes from depth 1 down to `node`."""
        nodes = []
        while node != ROOT:
            nodes.append(node)
            node = self.parents[node]
        return nodes[::-1]

    def tested(self, path: Sequence[int]) -> list[int]:
        """The nodes whose verification says something once `path` was accepted: the children of the current
        token and of the nodes on the path (the others were not reached)."""
        reached = {ROOT, *path}
        return [node for node, parent in enumerate(self.parents) if parent in reached]


EMPTY_TREE = TokenTree((), (), ())


def build_tree(drafts: Sequence[Draft], budget: int, max_length: int, confidences: Confidences | None = None,
               context: Hashable = None) -> TokenTree:
    """Merge `drafts` into a tree of at most `budget` nodes and depth `max_length`, best nodes first.

    With `confidences`, the probabilities of drafts that name their evidence are its calibrated ones for the
    row's `context` (see `confidence.key`). A tree's expected accepted tokens: at most one node per depth is
    accepted, so the chance that verification accepts a depth is the sum of its nodes' scores, at most 1."""
    if budget <= 0 or not drafts:
        return EMPTY_TREE
    # Trie over all drafts, its nodes numbered as first seen: (parent's number, token) -> number, and per number
    # the token, parent, score, depth and the drafts' confidence keys. (Numbers, not paths, as keys: hashing a
    # path costs its depth.)
    children: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    depths: list[int] = []
    keys: list[list[Key]] = []
    # (node, evidence) -> (the source's probability, the path's before it, after it): drafts of one source that
    # share a prefix make the same claims along it, calibrated once and tested once.
    claims: dict[tuple[int, Hashable], tuple[float, float, float]] = {}
    for draft in drafts:
        parent, probability = ROOT, 1.0
        evidence = draft.evidence if confidences is not None else None
        for depth, (token, p) in enumerate(zip(draft.tokens[:max_length], draft.probabilities), start=1):
            node = children.get((parent, token))
            if evidence is not None:
                claim = None if node is None else claims.get((node, evidence))
                if claim is not None and claim[0] == p and claim[1] == probability:
                    parent, probability = node, claim[2]
                    continue
                token_key = key(context, evidence, depth, p)
                before, p = probability, confidences.probability(token_key, p)
            probability *= p
            if node is None:
                node = children[parent, token] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                scores.append(probability)
                depths.append(depth)
                keys.append([])
            elif probability > scores[node]:
                scores[node] = probability
            if evidence is not None:
                keys[node].append(token_key)
                claims[node, evidence] = (draft.probabilities[depth - 1], before, probability)
            parent = node
    # Best first; a parent scores at least as high as its children and is shallower, so it sorts before them.
    best = [node for _, _, node in sorted(zip([-score for score in scores], depths, range(len(tokens))))[:budget]]
    index = {node: i for i, node in enumerate(best)}
    depth_sums = [0.0] * (max_length + 1)
    expected, total = [], 0.0
    for node in best:
        depth, score = depths[node], scores[node]
        before = depth_sums[depth]
        depth_sums[depth] = before + score
        total += min(1.0, before + score) - min(1.0, before)
        expected.append(total)
    return TokenTree(
        tokens=tuple(tokens[node] for node in best),
        parents=tuple(ROOT if parents[node] == ROOT else index[parents[node]] for node in best),
        scores=tuple(scores[node] for node in best),
        expected=tuple(expected),
        keys=tuple(tuple(keys[node]) for node in best),
    )
