"""A draft memory across requests: the text of recent requests to one model, for drafting later ones.

SuffixDecoding (arXiv 2411.04975) drafts from a global suffix index over earlier outputs as well as from the
request's own text; this is that global index. Repeated templates, code, agent loops and answers grounded in the
same documents continue the way earlier requests did, and the memory proposes those continuations. Drafts are
verified like any other, so a memory changes how fast decoding goes, never what it commits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .confidence import Confidences
from .suffix import SuffixIndex, SuffixMatchSource

# Requests are indexed in blocks of about max_requests / BLOCKS. Evicting a request only hides its text from
# lookups; a block's index is dropped whole once all its requests are evicted. Nothing is ever re-indexed, the
# index holds at most one block of evicted text, and a lookup walks BLOCKS + 1 tries at most.
BLOCKS = 4
MAX_MATCH = 16  # the longest suffix looked up, in tokens


def model_identity(model) -> tuple[str, str, int]:
    """What a memory's drafts belong to: the model's name or path, its type and its vocabulary size (the
    number of logits, which a tokenizer of another vocabulary would not match)."""
    config = model.config
    return (getattr(config, "name_or_path", "") or "", getattr(config, "model_type", "") or "",
            model.get_output_embeddings().weight.shape[0])


def _describe(identity: tuple[str, str, int]) -> str:
    name, model_type, vocab = identity
    return f"{name or '(unnamed)'!r} ({model_type or 'unknown type'}, vocabulary {vocab})"


class DraftMemory:
    """The prompts and outputs of the last `max_requests` requests (and at most `max_tokens` tokens, when given)
    to one model, the oldest evicted first, with a suffix index over them; the model's latest top-k next tokens
    after every token it has seen (the recycled source's table, bounded by the vocabulary); the confidences in
    drafts that verification measured (`confidence.py`, bounded by its keys); and what an engine that drafts on
    the device learned while it served the memory's requests (its tables and pools, a copy per device, kept here
    while that engine serves other requests: `device_drafts.DeviceDrafter.learn_for`).

    `ld.generate(..., memory=memory)` drafts from it and adds every finished request's text to it; so does a
    scheduler opened with it (`decoding.open_scheduler(..., memory=memory)`), except for requests with
    `use_memory=False`. A memory belongs to the first model it is used with (`bind`): using it with another is a
    ValueError. It is not thread-safe: use it from the thread that runs the decoding.
    """

    def __init__(self, max_requests: int = 256, max_tokens: int | None = None) -> None:
        for name, value, optional in (("max_requests", max_requests, False), ("max_tokens", max_tokens, True)):
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.tokens = 0  # in the requests held
        self.added = 0  # requests ever added
        # token -> (the model's latest top-k next tokens after it, their probabilities): RecycledTopKSource's table
        self.recycled: dict[int, tuple[Sequence[int], Sequence[float]]] = {}
        self.confidences = Confidences()
        # device -> the tables and pools an engine's drafter learned for this memory, and the drafter that holds
        # newer ones than those, if any (both kept by the drafter)
        self.device_learned: dict[str, dict] = {}
        self.device_holder = None
        self._block_size = -(-max_requests // BLOCKS)  # requests per block
        self._blocks: deque[SuffixIndex] = deque()  # oldest first; requests are added to the last
        # The requests held, oldest first: (their block, where their text ends in it, their tokens).
        self._requests: deque[tuple[SuffixIndex, int, int]] = deque()
        self._identity: tuple[str, str, int] | None = None

    def __len__(self) -> int:
        """The number of requests held."""
        return len(self._requests)

    @property
    def indexed_tokens(self) -> int:
        """Tokens in the index: those of the requests held and of evicted ones whose block is still in use."""
        return sum(len(block.text) - block.documents for block in self._blocks)

    def bind(self, model) -> None:
        """Tie the memory to `model` on first use; a later call with another model (another name or path, type or
        vocabulary) raises ValueError: drafts of one model are no guesses for another's tokens."""
        identity = model_identity(model)
        if self._identity is None:
            self._identity = identity
        elif identity != self._identity:
            raise ValueError(f"this DraftMemory holds the text of model {_describe(self._identity)} and cannot draft "
                             f"for model {_describe(identity)}: a memory never crosses models or tokenizers; use "
                             "one DraftMemory per model")

    def add(self, tokens: Sequence[int]) -> None:
        """Learn a finished request's text (prompt and output), evicting the oldest requests beyond the bounds. A
        text longer than `max_tokens` is kept by its last `max_tokens` tokens."""
        if self.max_tokens is not None:
            tokens = tokens[-self.max_tokens:]
        if not tokens:
            return
        if not self._blocks or self._blocks[-1].documents == self._block_size:
            self._blocks.append(SuffixIndex(MAX_MATCH))
        block = self._blocks[-1]
        block.extend(tokens)
        block.end_document()
        self._requests.append((block, len(block.text), len(tokens)))
        self.tokens += len(tokens)
        self.added += 1
        while len(self._requests) > self.max_requests or (self.max_tokens is not None
                                                           and self.tokens > self.max_tokens):
            self._evict_oldest()

    def texts(self) -> list[list[int]]:
        """The texts of the requests held, oldest first (what a step that drafts on the device copies from)."""
        return [list(block.text[end - 1 - tokens : end - 1]) for block, end, tokens in self._requests]

    def _evict_oldest(self) -> None:
        block, end, tokens = self._requests.popleft()
        self.tokens -= tokens
        block.first_live = end
        if end == len(block.text):  # its last request: the block (the oldest) holds nothing live any more
            self._blocks.popleft()

    def find(self, history: Sequence[int], max_length: int, limit: int) -> tuple[int, list[list[int]]]:
        """The longest suffix of `history` that occurs in the requests held, with a token after it: its length,
        and what followed its `limit` most recent occurrences, up to `max_length` tokens each, newest first (0 and
        [] if none)."""
        best, found = 0, []
        for block in reversed(self._blocks):
            length, ends = block.find_match(history, limit)
            if length > best:
                best, found = length, [(block, ends)]
            elif length == best and length:
                found.append((block, ends))
        continuations: list[list[int]] = []
        for block, ends in found:
            continuations.extend(block.continuations(ends[:limit - len(continuations)], max_length))
        return best, continuations


class MemorySource(SuffixMatchSource):
    """Drafts for one sequence from a DraftMemory: the continuations of the longest suffix of its history found
    in earlier requests' text, scored as `SuffixMatchSource` scores them. The memory learns from the scheduler,
    when a request finishes; the sequence's own text is `SuffixSource`'s.

    The defaults committed the most tokens per step on 24 HumanEval prompts in a row (SmolLM2-135M, one fixed
    shape of a 32-node tree): min_match 2 rather than 1 or 3, 16 occurrences rather than 8 or 32, a confidence
    offset of 1 rather than 0.5 or 2, a floor of 0.1 rather than 0.05."""

    name = "memory"

    def __init__(self, memory: DraftMemory, min_match: int = 2, max_occurrences: int = 16,
                 min_probability: float = 0.1, confidence_offset: float = 1.0) -> None:
        super().__init__(min_match, max_occurrences, min_probability, confidence_offset)
        self.memory = memory

    def find(self, history, max_length):
        return self.memory.find(history, max_length, self.max_occurrences)
