"""The fused step's layout and mask against a brute-force reading of the rules in algorithm.md, section 1.4."""

import pytest
import torch

from lookahead_decoding import LookaheadConfig
from lookahead_decoding.layout import StepLayout


def brute_force(window, ngram, guesses, candidate_length):
    """Rows as (kind, a, b): ('la', level, column) or ('cand', k, j), in input order; then the mask by the rules."""
    rows = [("la", 0, c) for c in range(window)]
    rows += [("la", level, c) for level in range(1, ngram - 1) for c in range(window)]
    rows += [("cand", k, j) for k in range(guesses) for j in range(candidate_length)]
    positions = [(r[1] + r[2]) if r[0] == "la" else 1 + r[2] for r in rows]
    size = len(rows)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for q, (qkind, qa, qb) in enumerate(rows):
        for k, (kkind, ka, kb) in enumerate(rows):
            if qkind == "la" and kkind == "la":
                row0_prefix = ka == 0 and kb <= qb
                own_column = qa >= 1 and 1 <= ka <= qa and kb == qb
                mask[q, k] = row0_prefix or own_column
            elif qkind == "cand":
                current_token = kkind == "la" and ka == 0 and kb == 0
                own_prefix = kkind == "cand" and ka == qa and kb <= qb
                mask[q, k] = current_token or own_prefix
    last_level = [i for i, r in enumerate(rows) if r[0] == "la" and r[1] == ngram - 2]
    cand_rows = [i for i, r in enumerate(rows) if r[0] == "cand"]
    return torch.tensor(positions), mask, list(dict.fromkeys([0] + last_level + cand_rows))  # each row once


@pytest.mark.parametrize("window", [1, 2, 4, 7])
@pytest.mark.parametrize("ngram", [2, 3, 4, 6])
@pytest.mark.parametrize("guesses", [0, 1, 2, 5])
@pytest.mark.parametrize("candidate_length", [None, 1, 5])
def test_layout_matches_brute_force(window, ngram, guesses, candidate_length):
    config = LookaheadConfig(window, ngram, guesses, candidate_length=candidate_length)
    layout = StepLayout.build(config)
    k = ngram - 1 if candidate_length is None else candidate_length
    positions, mask, logit_rows = brute_force(window, ngram, guesses, k)
    assert config.candidate_length == k
    assert layout.size == config.tokens_per_step == (ngram - 1) * window + guesses * k
    assert torch.equal(layout.position_offsets, positions)
    assert torch.equal(layout.allowed, mask)
    assert layout.logit_rows.tolist() == logit_rows


def test_mask_printed_in_algorithm_md():
    """The W=4, N=4, G=2 mask drawn in algorithm.md, row by row."""
    drawn = """
1.................
11................
111...............
1111..............
1...1.............
11...1............
111...1...........
1111...1..........
1...1...1.........
11...1...1........
111...1...1.......
1111...1...1......
1...........1.....
1...........11....
1...........111...
1..............1..
1..............11.
1..............111"""
    expected = torch.tensor([[ch == "1" for ch in line] for line in drawn.split()])
    layout = StepLayout.build(LookaheadConfig(window=4, ngram=4, guesses=2))
    assert torch.equal(layout.allowed, expected)
    assert layout.position_offsets.tolist() == [0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 1, 2, 3, 1, 2, 3]


def test_pool_cuts_and_pads_continuations_to_the_candidate_length():
    from lookahead_decoding.ngram_pool import NGramPool

    pool = NGramPool(continuation_length=4, capacity=3)
    pool.add(7, [1, 2])  # a window n-gram shorter than K: padded with its last token
    pool.add(7, [1, 2, 3, 4, 5, 6])  # longer than K: cut
    pool.add_ngrams([7, 9, 8, 7, 6])  # text n-grams are K + 1 tokens long
    assert pool.lookup(7) == [(9, 8, 7, 6), (1, 2, 3, 4), (1, 2, 2, 2)]
