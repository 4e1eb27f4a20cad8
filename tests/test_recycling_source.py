"""RecycledTopKSource: the table keeps each token's latest top-k predictions, and propose expands it best-first."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_decoding.drafting.base import ModelPredictions
from lookahead_decoding.drafting.recycling import RecycledTopKSource

VOCAB = 5


def source_with(table, **kwargs):
    """A source that has observed `table` (token -> list of (next token, probability)) as one step's predictions,
    each token's next tokens most likely first (as `ModelPredictions` lists them)."""
    source = RecycledTopKSource(**kwargs)
    table = {token: sorted(row, key=lambda item: -item[1]) for token, row in table.items()}
    tokens = list(table)
    source.observe_predictions(ModelPredictions(
        tokens, [[t for t, _ in table[token]] for token in tokens], [[p for _, p in table[token]] for token in tokens]))
    return source


def all_paths(table, root, max_length):
    """Every path from `root` of 1..max_length tokens, with its path probability (multiplied root first)."""
    paths = {}
    stack = [((), root, 1.0)]
    while stack:
        path, token, path_probability = stack.pop()
        if len(path) == max_length:
            continue
        for next_token, probability in table.get(token, ()):
            child = (path + (next_token,), next_token, path_probability * probability)
            paths[child[0]] = child[2]
            stack.append(child)
    return paths


def check_conditional_probabilities(source, history, drafts):
    for draft in drafts:
        previous = history[-1]
        for token, probability in zip(draft.tokens, draft.probabilities):
            next_tokens, next_probabilities = source.table[previous]
            assert probability == next_probabilities[next_tokens.index(token)]
            previous = token


def path_probability(draft):
    return math.prod(draft.probabilities)


def test_latest_prediction_wins_and_rows_are_cut_to_top_k():
    source = RecycledTopKSource(top_k=2)
    assert source.predictions_wanted == 2
    source.observe_predictions(ModelPredictions([1, 2], [[3, 4, 5], [6]], [[0.5, 0.3, 0.2], [0.9]]))
    source.observe_predictions(ModelPredictions([1, 1], [[7, 8, 9], [4, 3, 2]], [[0.6, 0.2, 0.1], [0.7, 0.2, 0.1]]))
    assert {token: tuple(map(tuple, row)) for token, row in source.table.items()} == {1: ((4, 3), (0.7, 0.2)),
                                                                                        2: ((6,), (0.9,))}
    source.observe_predictions(ModelPredictions([2], [[5, 6]], [[0.5, 0.4]]))  # rows of exactly top_k
    assert tuple(map(tuple, source.table[2])) == ((5, 6), (0.5, 0.4))


def test_unknown_token_gives_no_drafts():
    source = source_with({1: [(2, 0.9)]})
    assert source.propose([0, 3], max_length=4, budget=10) == []
    assert source.propose([1], max_length=0, budget=10) == []
    assert source.propose([1], max_length=4, budget=0) == []


def test_drafts_follow_the_table_best_first():
    table = {0: [(1, 0.6), (2, 0.3)], 1: [(2, 0.9), (0, 0.05)], 2: [(0, 0.5)]}
    source = source_with(table, min_probability=0.0)
    drafts = source.propose([7, 0], max_length=2, budget=4)
    # Kept: 1 (0.6), 1-2 (0.54), 2 (0.3), 2-0 (0.15); 1-0 (0.03) is the fifth.
    assert [d.tokens for d in drafts] == [(1, 2), (2, 0)]
    assert drafts[0].probabilities == (0.6, 0.9)
    assert drafts[1].probabilities == (0.3, 0.5)


def test_min_probability_stops_unlikely_nodes():
    table = {0: [(1, 0.6), (2, 0.3)], 1: [(1, 0.6)]}
    drafts = source_with(table, min_probability=0.32).propose([0], max_length=5, budget=100)
    assert [d.tokens for d in drafts] == [(1, 1)]  # 0.6, 0.36; then 0.216 and the sibling 0.3 are below


def test_keep_across_generations():
    table = {0: [(1, 0.9)]}
    kept = source_with(table)
    kept.begin([4, 0])
    assert kept.propose([0], max_length=3, budget=8)
    cleared = source_with(table, keep_across_generations=False)
    cleared.begin([4, 0])
    assert cleared.table == {}
    assert cleared.propose([0], max_length=3, budget=8) == []


tables = st.dictionaries(
    st.integers(0, VOCAB - 1),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4, unique=True).flatmap(
        lambda next_tokens: st.lists(st.sampled_from([0.05, 0.1, 0.3, 0.5, 0.9, 1.0]), min_size=len(next_tokens),
                                     max_size=len(next_tokens)).map(lambda ps: list(zip(next_tokens, ps)))),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(table=tables, root=st.integers(0, VOCAB - 1), max_length=st.integers(1, 4), budget=st.integers(1, 40),
       min_probability=st.sampled_from([0.0, 0.01, 0.2]))
def test_kept_nodes_are_the_likeliest_paths(table, root, max_length, budget, min_probability):
    source = source_with(table, top_k=8, min_probability=min_probability)
    history = [3, root]
    drafts = source.propose(history, max_length, budget)

    check_conditional_probabilities(source, history, drafts)
    assert all(1 <= len(d.tokens) <= max_length for d in drafts)
    scores = [path_probability(d) for d in drafts]
    assert scores == sorted(scores, reverse=True)
    kept = {d.tokens[:i] for d in drafts for i in range(1, len(d.tokens) + 1)}
    leaves = {d.tokens for d in drafts}
    assert len(leaves) == len(drafts)
    assert not any(leaf[:i] in leaves for leaf in leaves for i in range(1, len(leaf)))  # only leaves are drafts

    candidates = {path: p for path, p in all_paths(table, root, max_length).items() if p >= min_probability}
    assert kept <= candidates.keys()
    likeliest = sorted(candidates.values(), reverse=True)[:budget]
    # Ties aside, the kept nodes are the `budget` likeliest: the same path probabilities, as multisets.
    assert sorted((candidates[path] for path in kept), reverse=True) == likeliest
