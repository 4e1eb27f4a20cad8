"""SuffixSource: longest suffix match, continuations taken from the text, frequency scores, floor and limits."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_decoding.drafting.suffix import SuffixSource

# Small alphabets make repetitions, and so long matches, likely.
texts = st.lists(st.integers(0, 3), min_size=1, max_size=60)

# "1 2" is followed by 3, 4, ..., 0 once, and nothing longer matches: every token scores 1 * 2/3.
CHAIN = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]


def indexed(text, **kwargs) -> SuffixSource:
    source = SuffixSource(**kwargs)
    source.begin(text)
    return source


def brute_force_match(text, max_match):
    """Longest suffix of `text` (at most max_match) ending at an earlier position p with p + 1 < len(text)."""
    for k in range(min(max_match, len(text)), 0, -1):
        ends = [p for p in range(k - 1, len(text) - 1) if text[p - k + 1: p + 1] == text[-k:]]
        if ends:
            return k, ends[::-1]
    return 0, []


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(1, 8))
def test_longest_match_equals_brute_force(text, max_match):
    assert indexed(text, max_match=max_match, min_match=1).find_match(text) == brute_force_match(text, max_match)


@settings(max_examples=100, deadline=None)
@given(motif=st.lists(st.integers(0, 5), min_size=1, max_size=9), edits=st.lists(st.tuples(st.integers(0, 79),
       st.integers(0, 5)), max_size=6), max_match=st.integers(6, 16))
def test_long_repeats_match_as_far_as_the_text_repeats(motif, edits, max_match):
    """Repeated text with a few changed tokens: k-grams seen once stay leaves until they recur, so lookups after
    every token, deep into the repeats, must still find the longest match and all of its positions."""
    text = (motif * (80 // len(motif) + 1))[:80]
    for position, token in edits:
        text[position] = token
    source = SuffixSource(max_match=max_match, min_match=1)
    source.begin(text[:1])
    for end in range(2, len(text) + 1):
        source.observe(text[:end], 1)
        assert source.find_match(text[:end]) == brute_force_match(text[:end], max_match)


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(1, 6))
def test_continuations_and_scores_come_from_the_text(text, max_length):
    """Without floor or budget, the drafts are the maximal continuations, each token scored by its share."""
    source = indexed(text, max_match=8, min_match=1, min_probability=0.0)
    match_length, ends = brute_force_match(text, 8)
    continuations = [tuple(text[p + 1: p + 1 + max_length]) for p in ends]
    maximal = {c for c in continuations if not any(len(d) > len(c) and d[: len(c)] == c for d in continuations)}
    drafts = source.propose(text, max_length, budget=10_000)
    assert {draft.tokens for draft in drafts} == maximal
    confidence = match_length / (match_length + 1)
    for tokens, probabilities, _ in drafts:
        assert 1 <= len(tokens) <= max_length
        for i, probability in enumerate(probabilities):
            going_on = [c for c in continuations if len(c) > i and c[:i] == tokens[:i]]
            share = sum(c[i] == tokens[i] for c in going_on) / len(going_on)
            assert probability == pytest.approx(share * confidence)


@settings(max_examples=200, deadline=None)
@given(texts, st.integers(1, 6), st.integers(1, 12), st.floats(0.0, 0.6))
def test_drafts_are_best_first_above_the_floor_within_the_budget(text, max_length, budget, floor):
    drafts = indexed(text, min_match=1, min_probability=floor).propose(text, max_length, budget)
    paths = [math.prod(draft.probabilities) for draft in drafts]
    assert paths == sorted(paths, reverse=True)
    assert all(path >= floor for path in paths)
    assert len({draft.tokens[:i] for draft in drafts for i in range(1, len(draft.tokens) + 1)}) <= budget


def test_frequency_score_is_the_count_ratio():
    # "1 2" occurs 4 times before the end, each time after a different token: followed by 7 three times, by 8 once.
    text = [1, 2, 7, 3, 1, 2, 7, 4, 1, 2, 8, 5, 1, 2, 7, 6, 9, 1, 2]
    drafts = indexed(text).propose(text, max_length=1, budget=10)
    confidence = 2 / 3
    assert drafts == [((7,), (pytest.approx(0.75 * confidence),), ("suffix", 2)),
                      ((8,), (pytest.approx(0.25 * confidence),), ("suffix", 2))]  # evidence: a match of 2 tokens


def test_the_floor_stops_drafts():
    # Path probabilities (2/3)^n: 0.67, 0.44, 0.30, 0.20, 0.13, then 0.088 falls below 0.1.
    assert [d.tokens for d in indexed(CHAIN).propose(CHAIN, 10, 100)] == [(3, 4, 5, 6, 7)]
    assert [d.tokens for d in indexed(CHAIN, min_probability=0.5).propose(CHAIN, 10, 100)] == [(3,)]
    assert indexed(CHAIN, min_probability=0.7).propose(CHAIN, 10, 100) == []


def test_max_length_and_budget_cut_drafts():
    assert [d.tokens for d in indexed(CHAIN).propose(CHAIN, 2, 100)] == [(3, 4)]
    assert [d.tokens for d in indexed(CHAIN).propose(CHAIN, 10, 3)] == [(3, 4, 5)]


def test_longer_matches_are_trusted_more():
    text = [5, 1, 2, 3, 4, 9, 5, 1, 2, 3]
    assert indexed(text).propose(text, 1, 10) == [((4,), (pytest.approx(4 / 5),), ("suffix", 4))]


@settings(max_examples=200, deadline=None)
@given(texts, st.lists(st.integers(0, 60), max_size=5))
def test_incremental_observe_equals_indexing_from_scratch(text, cuts):
    cuts = sorted({min(cut, len(text)) for cut in cuts} | {len(text)})
    incremental = SuffixSource(max_match=6, min_match=1)
    incremental.begin(text[: cuts[0]])
    for start, stop in zip(cuts, cuts[1:]):
        incremental.observe(text[:stop], stop - start)
    from_scratch = indexed(text, max_match=6, min_match=1)
    for end in range(1, len(text) + 1):
        assert incremental.find_match(text[:end]) == from_scratch.find_match(text[:end])
        assert incremental.propose(text[:end], 4, 20) == from_scratch.propose(text[:end], 4, 20)


def test_no_match_gives_no_drafts():
    assert indexed([1, 2, 3, 4]).propose([1, 2, 3, 4], 5, 10) == []
    # A one-token match is below the default min_match of 2.
    assert indexed([1, 2, 3, 1]).propose([1, 2, 3, 1], 5, 10) == []
    assert indexed([1, 2, 3, 1], min_match=1).propose([1, 2, 3, 1], 5, 10) != []


def test_begin_resets():
    source = indexed(CHAIN)
    source.begin([1, 2, 3, 4])
    assert source.propose([1, 2, 3, 4], 5, 10) == []
    source.begin(CHAIN)
    assert source.propose(CHAIN, 10, 100) == indexed(CHAIN).propose(CHAIN, 10, 100)
