"""The n-gram pool: for each key token, the most recently seen continuations of fixed length (LRU)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class NGramPool:
    """Maps a token to at most `capacity` continuations of `continuation_length` tokens, newest last.

    Re-inserting a continuation refreshes it; inserting into a full key evicts the least recently seen one. Each
    continuation remembers whether only the Jacobi window ever produced it (`from_window`), or the text too.
    A longer continuation is cut to length; a shorter one is padded by repeating its last token, a guess that
    verification accepts only where it is right.
    """

    def __init__(self, continuation_length: int, capacity: int) -> None:
        self.continuation_length = continuation_length
        self.capacity = capacity
        self._table: dict[int, OrderedDict[tuple[int, ...], bool]] = {}  # continuation -> only from the window

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._table.values())

    def add(self, key: int, continuation: Sequence[int], from_window: bool = False) -> None:
        self.add_all(((key, continuation),), from_window)

    def add_all(self, ngrams: Iterable[tuple[int, Sequence[int]]], from_window: bool = False) -> None:
        """Add each (key, continuation) of `ngrams`, in order (one call per step's n-grams: this runs for every
        row of every step)."""
        if self.capacity == 0:
            return
        length, capacity, table = self.continuation_length, self.capacity, self._table
        for key, continuation in ngrams:
            continuation = tuple(continuation[:length])
            if len(continuation) < length:
                continuation += continuation[-1:] * (length - len(continuation))
            entries = table.get(key)
            if entries is None:  # (not setdefault: that would build an OrderedDict on every call)
                entries = table[key] = OrderedDict()
            elif continuation in entries:
                entries.move_to_end(continuation)
                if not from_window:  # the text produced it too
                    entries[continuation] = False
                continue
            entries[continuation] = from_window
            if len(entries) > capacity:
                entries.popitem(last=False)

    def add_ngrams(self, tokens: Sequence[int], start: int = 0) -> None:
        """Add every n-gram of `tokens` that begins at index >= start."""
        n = self.continuation_length + 1
        self.add_all((tokens[i], tokens[i + 1 : i + n]) for i in range(start, len(tokens) - n + 1))

    def lookup(self, key: int) -> list[tuple[int, ...]]:
        """Continuations stored under `key`, most recently seen first."""
        entries = self._table.get(key)
        return list(reversed(entries)) if entries else []

    def lookup_origins(self, key: int) -> list[tuple[tuple[int, ...], bool]]:
        """(continuation, whether only the window produced it) under `key`, most recently seen first."""
        entries = self._table.get(key)
        return list(reversed(entries.items())) if entries else []
