"""The token tree: merging drafts best first under a budget, and greedy verification against a brute-force walk."""

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_decoding.drafting import Draft, build_tree
from lookahead_decoding.drafting.tree import ROOT
from lookahead_decoding.layout import tree_tensors
from lookahead_decoding.step import tree_parents
from lookahead_decoding.verification import verify_greedy


def test_drafts_that_share_a_prefix_share_its_nodes():
    tree = build_tree([Draft((5, 6, 7), (0.9, 0.9, 0.9)), Draft((5, 6, 8), (0.9, 0.5, 0.5)), Draft((4,), (0.3,))], 10, 8)
    assert tree.tokens == (5, 6, 7, 4, 8)  # best first: 0.9, 0.81, 0.729, 0.3, 0.225
    assert tree.parents == (ROOT, 0, 1, ROOT, 1)
    assert tree.scores == (0.9, 0.9 * 0.9, 0.9 * 0.9 * 0.9, 0.3, 0.9 * 0.5 * 0.5)
    assert tree.path(4) == [0, 1, 4]


def test_a_node_scores_its_best_draft_and_the_budget_keeps_the_best_nodes():
    drafts = [Draft((1, 2), (0.2, 1.0)), Draft((1, 3), (0.6, 0.5)), Draft((9, 9, 9), (0.5, 0.9, 0.9))]
    tree = build_tree(drafts, 3, 8)
    # 1 scores 0.6 (its best draft), 9 scores 0.5; then 9·9 (0.45) beats 1·3 (0.3) and 1·2 (0.2).
    assert tree.tokens == (1, 9, 9) and tree.parents == (ROOT, ROOT, 1)
    assert build_tree(drafts, 3, 1).tokens == (1, 9)  # depth limited to one token


@st.composite
def draft_lists(draw):
    tokens = st.integers(0, 4)  # few tokens: drafts collide often
    drafts = []
    for _ in range(draw(st.integers(0, 6))):
        length = draw(st.integers(1, 5))
        drafts.append(Draft(tuple(draw(st.lists(tokens, min_size=length, max_size=length))),
                            tuple(draw(st.lists(st.floats(0.01, 1.0), min_size=length, max_size=length)))))
    return drafts


@settings(max_examples=200, deadline=None, derandomize=True)
@given(drafts=draft_lists(), budget=st.integers(0, 12), max_length=st.integers(1, 5))
def test_the_tree_is_the_best_nodes_of_all_drafts_and_its_prefixes_are_trees(drafts, budget, max_length):
    tree = build_tree(drafts, budget, max_length)
    # Brute force: every prefix of every draft, scored by its best draft.
    best: dict[tuple, float] = {}
    for draft in drafts:
        score = 1.0
        for i in range(min(len(draft.tokens), max_length)):
            score *= draft.probabilities[i]
            prefix = draft.tokens[: i + 1]
            best[prefix] = max(best.get(prefix, 0.0), score)
    assert len(tree) == min(budget, len(best))
    paths = [tuple(tree.tokens[n] for n in tree.path(node)) for node in range(len(tree))]
    assert len(set(paths)) == len(paths)  # no token sequence twice
    assert [best[p] for p in paths] == list(tree.scores)
    assert sorted(best.values(), reverse=True)[: len(tree)] == sorted(tree.scores, reverse=True)
    assert all(parent < node for node, parent in enumerate(tree.parents))  # parents first: prefixes are trees
    assert all(len(p) <= max_length for p in paths)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data(), budget=st.integers(0, 10), max_depth=st.integers(1, 4))
def test_greedy_tree_verification_matches_a_walk_down_the_tree(data, budget, max_depth):
    drafts = data.draw(draft_lists())
    tree = build_tree(drafts, budget, max_depth)
    vocab = 5
    node_preds = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=budget, max_size=budget)),
                              dtype=torch.long)
    next_token = torch.tensor(data.draw(st.integers(0, vocab - 1)))
    padded_tokens = list(tree.tokens) + [0] * (budget - len(tree))
    device_tree = tree_tensors(torch.tensor(padded_tokens, dtype=torch.long),
                               torch.tensor(tree_parents(tree, budget), dtype=torch.long), torch.tensor(len(tree)),
                               max_depth)
    packed = verify_greedy(next_token, node_preds, device_tree, max_depth).tolist()
    # The walk: from the current token, follow the child whose token is the model's prediction (the first such
    # child; children have distinct tokens anyway), as long as there is one.
    expected_path, prediction, node = [], int(next_token), ROOT
    while True:
        child = next((i for i in range(len(tree)) if tree.parents[i] == node and tree.tokens[i] == prediction), None)
        if child is None:
            break
        expected_path.append(child)
        prediction, node = int(node_preds[child]), child
    accepted = len(expected_path)
    assert packed[0] == accepted
    assert packed[1 : 2 + accepted] == [int(next_token)] + [int(node_preds[n]) for n in expected_path]
    assert packed[2 + max_depth : 2 + max_depth + accepted] == expected_path


def test_a_prefix_of_a_chain_is_never_accepted_past_a_mismatch():
    # One chain 1 -> 2 -> 3 where the model agrees at depths 1 and 3 but not 2: only depth 1 is accepted.
    tree = build_tree([Draft((1, 2, 3), (1.0, 1.0, 1.0))], 3, 3)
    device_tree = tree_tensors(torch.tensor([1, 2, 3]), torch.tensor(tree_parents(tree, 3)), torch.tensor(3), 3)
    packed = verify_greedy(torch.tensor(1), torch.tensor([7, 3, 4]), device_tree, 3).tolist()
    assert packed[0] == 1 and packed[1:3] == [1, 7]
    assert list(itertools.islice(packed, 5, 6)) == [0]
