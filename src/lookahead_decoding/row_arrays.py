"""Every row's committed tokens, budget, end-of-sequence ids and counters, as arrays over a batch's rows.

A step whose shape drafts nothing on the host (plain, or drafting on the device) needs nothing of a row but its
current token, and hands back each row's accepted tokens. `commit` takes them for all rows at once: it cuts each
row's tokens at its budget and its first end-of-sequence token, appends them, marks the rows that stopped and counts
the step, in a few array operations whatever the number of rows. A row's tokens wait in its `tail` until something
reads its history (a source drafting from it, its result), which `flush` appends to the row's Python list then.

Rows with a streamer or stopping criteria need Python after every token; they, and every row in a step that
verifies the host's drafts, commit through `state.Emitter`, which reads and writes the same arrays.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy

TAIL = 256  # tokens a row may commit through `commit` before they are moved to its history list


class RowArrays:
    def __init__(self, rows: int, shapes: int = 1, most_committed: int = 1) -> None:
        """rows: the batch's rows; shapes: the step shapes steps are counted by; most_committed: the most tokens a
        row commits in one step."""
        self.remaining = numpy.zeros(rows, dtype=numpy.int64)  # new tokens each row may still commit
        self.done = numpy.zeros(rows, dtype=bool)  # whether the row's generation has stopped
        self.eos = numpy.full((rows, 1), -1, dtype=numpy.int64)  # each row's end-of-sequence ids, -1 padded
        self.simple = numpy.zeros(rows, dtype=bool)  # no streamer and no stopping criteria: `commit` may commit
        self.last = numpy.zeros(rows, dtype=numpy.int64)  # each row's current token (its last committed)
        self.length = numpy.zeros(rows, dtype=numpy.int64)  # each row's tokens: prompt and committed
        self.histories: list[list[int] | None] = [None] * rows  # each row's prompt and tokens, less its tail
        self.tail = numpy.zeros((rows, TAIL), dtype=numpy.int64)
        self.tail_length = numpy.zeros(rows, dtype=numpy.int64)
        # What `commit` counted of each row: its steps, {tokens committed in a step: steps}, steps by shape.
        self.steps = numpy.zeros(rows, dtype=numpy.int64)
        self.committed_steps = numpy.zeros((rows, most_committed + 1), dtype=numpy.int64)
        self.shape_steps = numpy.zeros((rows, shapes), dtype=numpy.int64)

    def start(self, row: int, history: list[int], max_new_tokens: int, eos_ids: Iterable[int], simple: bool) -> None:
        """Hold a new sequence in `row`: its history list (the prompt so far), which it extends."""
        eos = sorted(eos_ids)
        if len(eos) > self.eos.shape[1]:
            wider = numpy.full((len(self.remaining), len(eos)), -1, dtype=numpy.int64)
            wider[:, : self.eos.shape[1]] = self.eos
            self.eos = wider
        self.eos[row] = -1
        self.eos[row, : len(eos)] = eos
        self.remaining[row], self.done[row], self.simple[row] = max_new_tokens, max_new_tokens == 0, simple
        self.histories[row] = history
        self.last[row], self.length[row] = (history[-1] if history else 0), len(history)
        self.tail_length[row] = self.steps[row] = 0
        self.committed_steps[row] = self.shape_steps[row] = 0

    def flush(self, row: int) -> list[int]:
        """The row's history, its tail appended first."""
        history = self.histories[row]
        count = self.tail_length[row]
        if count:
            history.extend(self.tail[row, :count].tolist())
            self.tail_length[row] = 0
        return history

    def commit(self, rows: numpy.ndarray, shape: int, committed: numpy.ndarray, proposed: numpy.ndarray
               ) -> numpy.ndarray:
        """For each of `rows` (simple rows that have not stopped), commit its first `proposed` tokens of
        `committed` ([rows, C]) in a step of `shape`, cut after its budget runs out or its first end-of-sequence
        token; returns how many each committed."""
        columns = numpy.arange(committed.shape[1])
        is_eos = (committed[:, :, None] == self.eos[rows][:, None, :]).any(axis=2) & (columns < proposed[:, None])
        through_eos = numpy.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, committed.shape[1] + 1)
        counts = numpy.minimum(numpy.minimum(proposed, self.remaining[rows]), through_eos)
        for row in rows[self.tail_length[rows] + counts > TAIL]:  # a full tail: into the history list
            self.flush(row)
        taken = columns < counts[:, None]
        self.tail[numpy.repeat(rows, counts), (self.tail_length[rows, None] + columns)[taken]] = committed[taken]
        self.tail_length[rows] += counts
        self.length[rows] += counts
        self.last[rows] = committed[numpy.arange(len(rows)), counts - 1]
        self.remaining[rows] -= counts
        self.done[rows] |= (self.remaining[rows] == 0) | (through_eos <= counts)
        self.steps[rows] += 1
        self.committed_steps[rows, counts] += 1
        self.shape_steps[rows, shape] += 1
        return counts
