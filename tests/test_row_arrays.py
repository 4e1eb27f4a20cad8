"""`RowArrays.commit` commits what a row's `Emitter` would, token by token: up to its budget and its first
end-of-sequence id, over many steps (its tail moving to the history list whenever it fills)."""

import numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_decoding.row_arrays import TAIL, RowArrays
from lookahead_decoding.state import Emitter

ROWS, WIDTH = 3, 5  # a step commits up to WIDTH tokens per row


def row_setup():
    return st.tuples(st.integers(1, 400), st.sets(st.integers(0, 30), max_size=3))  # budget, EOS ids


@settings(max_examples=60, deadline=None, derandomize=True)
@given(setups=st.lists(row_setup(), min_size=ROWS, max_size=ROWS), seed=st.integers(0, 2**32 - 1))
def test_commit_stops_each_row_as_its_emitter_would(setups, seed):
    rng = numpy.random.default_rng(seed)
    arrays = RowArrays(ROWS, shapes=2, most_committed=WIDTH)
    references = []
    for row, (budget, eos) in enumerate(setups):
        arrays.start(row, [7, 8], budget, eos, simple=True)
        references.append(Emitter([7, 8], budget, eos, None, None, "cpu"))
    steps = 0
    while not arrays.done.all():
        rows = numpy.flatnonzero(~arrays.done)
        committed = rng.integers(0, 400, (len(rows), WIDTH))  # tokens 0-30 are rare: long runs before an EOS
        proposed = rng.integers(1, WIDTH + 1, len(rows))
        counts = arrays.commit(rows, steps % 2, committed, proposed)
        for i, row in enumerate(rows):
            assert counts[i] == references[row].emit(committed[i, : proposed[i]].tolist())
            assert arrays.done[row] == references[row].done
        steps += 1
    for row, reference in enumerate(references):
        assert arrays.flush(row) == reference.history
        assert arrays.last[row] == reference.history[-1] and arrays.length[row] == len(reference.history)
        assert arrays.steps[row] == arrays.shape_steps[row].sum() == arrays.committed_steps[row].sum()


def test_a_row_commits_past_a_full_tail():
    arrays = RowArrays(1, most_committed=WIDTH)
    arrays.start(0, [1], 3 * TAIL, set(), simple=True)
    tokens = numpy.arange(3 * TAIL).reshape(-1, WIDTH - 2)  # three tokens a step: the tail fills mid-step
    for step in tokens:
        arrays.commit(numpy.array([0]), 0, numpy.pad(step, (0, 2))[None], numpy.array([3]))
    assert arrays.done[0] and arrays.flush(0) == [1, *range(3 * TAIL)]
