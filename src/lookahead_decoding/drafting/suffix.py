"""Drafts from the text's own repetitions: what followed earlier occurrences of the longest matching suffix.

The idea of SuffixDecoding (arXiv 2411.04975) and of SAM-Decoding's exact suffix matching (arXiv 2411.10666):
the text (prompt, then committed output) is indexed by every k-gram (a trie of reversed k-grams), the longest
suffix of the history that occurred before is looked up, and the tokens that followed its occurrences are merged
into a trie whose counts score them.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from .base import CandidateSource, Draft


class _TrieNode:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0  # continuations that pass through this node
        self.children: dict[int, _TrieNode] = {}


class SuffixSource(CandidateSource):
    """Continuations of the longest suffix of the history that occurs earlier in the text.

    Only the longest match is used, with no back-off to shorter ones: a shorter suffix's continuations ignore the
    context that the longer one saw (and one-token keys are the n-gram pool's job). `min_match` defaults to 2 for
    the same reason. A token's probability is the share of the continuations through its parent that go on with
    it (continuations cut short by the end of the text do not count against it), times the heuristic confidence
    `m / (m + confidence_offset)` for a match of m tokens: a longer matched context predicts more reliably.
    A draft stops where its path probability would drop below `min_probability`; of the trie nodes above that
    floor, the `budget` most probable are kept, and each draft is the path to one of them that has no kept child.
    """

    def __init__(self, max_match: int = 16, min_match: int = 2, max_occurrences: int = 64,
                 min_probability: float = 0.1, confidence_offset: float = 1.0) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match} and {max_match}")
        self.max_match = max_match
        self.min_match = min_match
        self.max_occurrences = max_occurrences
        self.min_probability = min_probability
        self.confidence_offset = confidence_offset
        self._text: list[int] = []
        # Every k-gram (1 <= k <= max_match) of the text, read backwards from its last token, as a path in a trie;
        # a node holds the positions where its k-gram ends, ascending, then its children (the preceding token).
        # Indexing a token walks one path of small-int keys rather than hashing max_match tuples.
        self._trie: dict[int, tuple[list[int], dict]] = {}

    def begin(self, prompt: Sequence[int]) -> None:
        self._text = []
        self._trie = {}
        self._extend(prompt)

    def observe(self, history: Sequence[int], num_new: int) -> None:
        # The text is always a prefix of the history: index whatever it does not hold yet.
        self._extend(history[len(self._text):])

    def _extend(self, tokens: Sequence[int]) -> None:
        text = self._text
        for token in tokens:
            text.append(token)
            end = len(text) - 1
            children = self._trie
            for position in range(end, max(-1, end - self.max_match), -1):
                node = children.get(text[position])
                if node is None:
                    node = children[text[position]] = ([], {})
                node[0].append(end)
                children = node[1]

    def find_match(self, history: Sequence[int]) -> tuple[int, list[int]]:
        """The longest suffix of `history` (at most `max_match` tokens) that ends earlier in the text with a
        token after it: its length, and the positions where it ends, most recent first (0 and [] if none)."""
        length, ends = 0, []
        children = self._trie
        for k in range(1, min(self.max_match, len(history)) + 1):
            node = children.get(history[-k])
            # If the k-token suffix has no followed occurrence, no longer suffix has one: stop at the first miss.
            if node is None or node[0][0] + 1 >= len(self._text):
                break
            length, ends = k, node[0]
            children = node[1]
        return length, [end for end in reversed(ends) if end + 1 < len(self._text)]

    def propose(self, history: Sequence[int], max_length: int, budget: int) -> list[Draft]:
        match_length, ends = self.find_match(history)
        if match_length < self.min_match or max_length < 1 or budget < 1:
            return []
        root = _TrieNode()
        for end in ends[: self.max_occurrences]:
            node = root
            for token in self._text[end + 1: end + 1 + max_length]:
                node = node.children.setdefault(token, _TrieNode())
                node.count += 1
        confidence = match_length / (match_length + self.confidence_offset)

        # Best first over the trie: a child is never more probable than its parent, so nodes leave the heap in
        # order of path probability and the kept nodes form a subtree.
        heap: list[tuple[float, int, tuple[int, ...], tuple[float, ...], _TrieNode]] = []
        order = 0  # tie-break, so that the heap never compares nodes

        def push_children(path: float, tokens: tuple[int, ...], probabilities: tuple[float, ...],
                          node: _TrieNode) -> None:
            nonlocal order
            total = sum(child.count for child in node.children.values())
            for token, child in node.children.items():
                probability = child.count / total * confidence
                if path * probability >= self.min_probability:
                    heapq.heappush(heap, (-path * probability, order, tokens + (token,),
                                          probabilities + (probability,), child))
                    order += 1

        push_children(1.0, (), (), root)
        kept: list[Draft] = []
        has_kept_child: set[tuple[int, ...]] = set()
        while heap and len(kept) < budget:
            negative_path, _, tokens, probabilities, node = heapq.heappop(heap)
            kept.append(Draft(tokens, probabilities))
            has_kept_child.add(tokens[:-1])
            push_children(-negative_path, tokens, probabilities, node)
        return [draft for draft in kept if draft.tokens not in has_kept_child]
