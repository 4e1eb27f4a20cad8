"""Drafts from repetitions: what followed earlier occurrences of the longest suffix of the history that matches.

The idea of SuffixDecoding (arXiv 2411.04975) and of SAM-Decoding's exact suffix matching (arXiv 2411.10666):
a text is indexed by every k-gram (a trie of reversed k-grams), the longest suffix of the history that occurred
there is looked up, and the tokens that followed its occurrences are merged into a trie whose counts score them.
`SuffixSource` searches the sequence's own text (prompt, then committed output); `memory.MemorySource` searches
the text of earlier requests. Both draft through `SuffixMatchSource`.
"""

from __future__ import annotations

import heapq
from abc import abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Sequence

from .base import CandidateSource, Draft

SEPARATOR = -1  # ends a document in an index's text; no token id is negative, so no history ever matches it
TOKEN_BITS = 32  # a trie edge's key is (parent node << TOKEN_BITS) | token
MATCH_EVIDENCE = 6  # matches this long or longer share one confidence key


class SuffixIndex:
    """Where every k-gram (1 <= k <= max_match) of a token text ends, for longest-suffix lookups.

    Each k-gram, read backwards from its last token, is a path in a trie; a node knows its latest occurrence, and
    each occurrence where its k-gram ends and the node's occurrence before it. The trie is kept only as deep as it
    needs to be: a k-gram seen once is a leaf, and the longer k-grams through that one occurrence stay implicit
    (the text itself says how far a lookup matches there). A leaf grows a level when its k-gram occurs a second
    time. So indexing a token walks only as deep as the text has repeated itself, usually a few levels rather
    than max_match. The whole index is one dict of ints and a few int arrays, which Python's cyclic garbage
    collector does not walk object by object: a memory of many requests costs the collector nothing. A position
    is indexed when the token after it arrives, so every occurrence found has a continuation.

    The text may hold several documents, each closed by `end_document`: no k-gram and no continuation crosses
    from one into the next. Positions before `first_live` are forgotten (their documents were evicted): lookups
    skip them, without anything being deleted from the trie.
    """

    def __init__(self, max_match: int) -> None:
        self.max_match = max_match
        self.text = array("q")
        self.first_live = 0
        self.documents = 0  # documents closed so far
        self._document_start = 0
        self._children: dict[int, int] = {}  # (node << TOKEN_BITS) | token -> child node; node 0 is the root
        self._latest = array("q", [-1])  # node -> its latest occurrence
        self._end = array("q")  # occurrence -> where its k-gram ends
        self._previous = array("q")  # occurrence -> the same node's occurrence before it (-1: none)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append `tokens` to the current document."""
        text, children, latest, ends, previous = self.text, self._children, self._latest, self._end, self._previous
        max_match = self.max_match
        # Inlined below, since this runs for every token of every row: "node's k-gram ends at `end`" appends an
        # occurrence (its end, and the node's previous occurrence) and makes it the node's latest; a new node is a
        # leaf under its key whose k-gram has occurred once.
        for token in tokens:
            end = len(text) - 1  # now followed by `token`: the k-grams that end there are indexed
            text.append(token)
            node, depth = 0, 0
            for position in range(end, max(self._document_start, end - max_match + 1) - 1, -1):
                key = node << TOKEN_BITS | text[position]
                child = children.get(key, 0)
                if not child:  # a k-gram new to the text: a leaf, the longer ones through it stay implicit
                    children[key] = len(latest)
                    latest.append(len(ends))
                    previous.append(-1)
                    ends.append(end)
                    break
                depth += 1
                first = latest[child]
                if previous[first] == -1 and depth < max_match:
                    # A leaf seen a second time: its first occurrence gets its next level before this one does.
                    before = ends[first] - depth
                    if before >= 0 and text[before] != SEPARATOR:
                        children[child << TOKEN_BITS | text[before]] = len(latest)
                        latest.append(len(ends))
                        previous.append(-1)
                        ends.append(ends[first])
                previous.append(latest[child])
                latest[child] = len(ends)
                ends.append(end)
                node = child

    def end_document(self) -> None:
        self.text.append(SEPARATOR)
        self._document_start = len(self.text)
        self.documents += 1

    def find_match(self, history: Sequence[int], limit: int | None = None) -> tuple[int, list[int]]:
        """The longest suffix of `history` (at most `max_match` tokens) that occurs in the live text with a token
        after it: its length, and the positions where it ends, most recent first, at most `limit` of them (0 and
        [] if none)."""
        length, occurrence = 0, -1
        node, children, latest, ends, first_live = 0, self._children, self._latest, self._end, self.first_live
        longest = min(self.max_match, len(history))
        for k in range(1, longest + 1):
            node = children.get(node << TOKEN_BITS | history[-k], 0)
            # Without a live occurrence of the k-token suffix, no longer suffix has one: stop at the first miss.
            if not node or ends[latest[node]] < first_live:
                break
            length, occurrence = k, latest[node]
            if self._previous[occurrence] == -1:  # a leaf: the text at its one occurrence says how far it goes
                end, text = ends[occurrence], self.text
                while length < longest and end - length >= 0 and text[end - length] == history[-length - 1]:
                    length += 1
                break
        positions: list[int] = []
        while occurrence >= 0 and len(positions) != limit and ends[occurrence] >= first_live:
            positions.append(ends[occurrence])
            occurrence = self._previous[occurrence]
        return length, positions

    def continuations(self, ends: Iterable[int], max_length: int) -> Iterator[list[int]]:
        """What follows each of `ends`: up to `max_length` tokens, cut at the end of its document."""
        text = self.text
        for end in ends:
            continuation = text[end + 1: end + 1 + max_length].tolist()
            if SEPARATOR in continuation:
                del continuation[continuation.index(SEPARATOR):]
            yield continuation


class _TrieNode:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0  # continuations that pass through this node
        self.children: dict[int, _TrieNode] = {}


class SuffixMatchSource(CandidateSource):
    """Drafts the continuations of the longest suffix of the history found in some indexed text (`find`).

    Only the longest match is used, with no back-off to shorter ones: a shorter suffix's continuations ignore the
    context that the longer one saw (and one-token keys are the n-gram pool's job). `min_match` defaults to 2 for
    the same reason. A token's probability is the share of the continuations through its parent that go on with
    it (continuations cut short by the end of the text do not count against it), times the heuristic confidence
    `m / (m + confidence_offset)` for a match of m tokens: a longer matched context predicts more reliably. That
    heuristic is the prior: a draft's evidence is (`name`, the match length, capped at MATCH_EVIDENCE), and
    calibration learns per match length what verification accepts.
    A draft stops where its path probability would drop below `min_probability`; of the trie nodes above that
    floor, the `budget` most probable are kept, and each draft is the path to one of them that has no kept child.
    """

    name = "suffix"

    def __init__(self, min_match: int = 2, max_occurrences: int = 64, min_probability: float = 0.1,
                 confidence_offset: float = 1.0) -> None:
        if min_match < 1:
            raise ValueError(f"min_match must be at least 1, got {min_match}")
        self.min_match = min_match
        self.max_occurrences = max_occurrences
        self.min_probability = min_probability
        self.confidence_offset = confidence_offset

    @abstractmethod
    def find(self, history: Sequence[int], max_length: int) -> tuple[int, Iterable[Sequence[int]]]:
        """The longest suffix of `history` found: its length, and what followed its `max_occurrences` most recent
        occurrences, up to `max_length` tokens each (0 and nothing if none)."""

    def propose(self, history: Sequence[int], max_length: int, budget: int) -> list[Draft]:
        if max_length < 1 or budget < 1:
            return []
        match_length, continuations = self.find(history, max_length)
        if match_length < self.min_match:
            return []
        root = _TrieNode()
        for continuation in continuations:
            node = root
            for token in continuation:
                node = node.children.setdefault(token, _TrieNode())
                node.count += 1
        confidence = match_length / (match_length + self.confidence_offset)
        evidence = (self.name, min(match_length, MATCH_EVIDENCE))

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
            kept.append(Draft(tokens, probabilities, evidence))
            has_kept_child.add(tokens[:-1])
            push_children(-negative_path, tokens, probabilities, node)
        return [draft for draft in kept if draft.tokens not in has_kept_child]


class SuffixSource(SuffixMatchSource):
    """Continuations of the longest suffix of the history that occurs earlier in the sequence's own text (prompt,
    then committed output), at most `max_match` tokens long; see `SuffixMatchSource` for the scores."""

    def __init__(self, max_match: int = 16, min_match: int = 2, max_occurrences: int = 64,
                 min_probability: float = 0.1, confidence_offset: float = 1.0) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match} and {max_match}")
        super().__init__(min_match, max_occurrences, min_probability, confidence_offset)
        self.max_match = max_match
        self.index = SuffixIndex(max_match)

    def begin(self, prompt: Sequence[int]) -> None:
        self.index = SuffixIndex(self.max_match)
        self.index.extend(prompt)

    def observe(self, history: Sequence[int], num_new: int) -> None:
        # The text is always a prefix of the history: index whatever it does not hold yet.
        self.index.extend(history[len(self.index.text):])

    def find_match(self, history: Sequence[int]) -> tuple[int, list[int]]:
        """The longest suffix of `history` (at most `max_match` tokens) that ends earlier in the text with a
        token after it: its length, and the positions where it ends, most recent first (0 and [] if none)."""
        return self.index.find_match(history)

    def find(self, history, max_length):
        match_length, ends = self.index.find_match(history, self.max_occurrences)
        return match_length, self.index.continuations(ends, max_length)
