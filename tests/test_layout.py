"""The fused step's layout and mask against a brute-force reading of the rules in docs/algorithm.md ("The step's
input layout and attention mask"), with the verification branch as a token tree."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_decoding import LookaheadConfig
from lookahead_decoding.drafting.tree import ROOT, TokenTree
from lookahead_decoding.layout import StepLayout, tree_tensors
from lookahead_decoding.step import tree_parents


def brute_force(window, ngram, parents, budget):
    """Rows as (kind, a, b): ('la', level, column) or ('node', index, 0), in input order; then the mask by the
    rules, walking each node's parents one by one. Nodes past len(parents) are padding: children of the root."""
    parents = list(parents) + [ROOT] * (budget - len(parents))
    rows = [("la", 0, c) for c in range(window)]
    rows += [("la", level, c) for level in range(1, ngram - 1) for c in range(window)]
    lookahead = len(rows)
    rows += [("node", i, 0) for i in range(budget)]

    def chain(node):  # the node and its ancestors
        nodes = []
        while node != ROOT:
            nodes.append(node)
            node = parents[node]
        return nodes

    positions = [(r[1] + r[2]) if r[0] == "la" else len(chain(r[1])) for r in rows]
    size = len(rows)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for q, (qkind, qa, qb) in enumerate(rows):
        for k, (kkind, ka, kb) in enumerate(rows):
            if qkind == "la" and kkind == "la":
                row0_prefix = ka == 0 and kb <= qb
                own_column = qa >= 1 and 1 <= ka <= qa and kb == qb
                mask[q, k] = row0_prefix or own_column
            elif qkind == "node":
                current_token = k == 0
                ancestor = kkind == "node" and ka in chain(qa)
                mask[q, k] = current_token or ancestor
    last_level = [i for i, r in enumerate(rows) if r[0] == "la" and r[1] == ngram - 2]
    node_rows = list(range(lookahead, size))
    return torch.tensor(positions), mask, list(dict.fromkeys([0] + last_level + node_rows))  # each row once


@st.composite
def trees(draw, max_nodes=12, max_depth=5):
    """A random tree in the order build_tree gives: every parent before its children."""
    parents, depths = [], []
    for _ in range(draw(st.integers(0, max_nodes))):
        choices = [ROOT] + [i for i, d in enumerate(depths) if d < max_depth]
        parent = draw(st.sampled_from(choices))
        parents.append(parent)
        depths.append(1 if parent == ROOT else depths[parent] + 1)
    return parents


@settings(max_examples=150, deadline=None, derandomize=True)
@given(window=st.integers(1, 6), ngram=st.integers(2, 6), parents=trees(), extra=st.integers(0, 3))
def test_layout_matches_brute_force(window, ngram, parents, extra):
    budget = len(parents) + extra
    config = LookaheadConfig(window, ngram, guesses=0, candidate_length=5, tree_nodes=budget)
    layout = StepLayout.build(config)
    tree = TokenTree(tuple(range(len(parents))), tuple(parents), (1.0,) * len(parents))
    device_tree = tree_tensors(torch.zeros(budget, dtype=torch.long), torch.tensor(tree_parents(tree, budget), dtype=torch.long),
                               torch.tensor(len(tree)), config.candidate_length)
    positions, mask, logit_rows = brute_force(window, ngram, parents, budget)
    assert layout.size == config.tokens_per_step == (ngram - 1) * window + budget
    assert torch.equal(layout.positions(device_tree), positions)
    assert torch.equal(layout.allowed(device_tree), mask)
    assert layout.logit_rows.tolist() == logit_rows
    assert device_tree.valid.tolist() == [i < len(parents) for i in range(budget)]
    assert device_tree.depths[: len(parents)].tolist() == [len(tree.path(i)) for i in range(len(parents))]


def test_the_default_tree_has_the_rows_of_g_candidates():
    assert LookaheadConfig(4, 4, 2).tree_nodes == 6
    assert LookaheadConfig(4, 4, 2, candidate_length=5).tree_nodes == 10
    assert LookaheadConfig(4, 4, 2, candidate_length=5, tree_nodes=7).tokens_per_step == 12 + 7


def test_mask_of_two_separate_candidates():
    """The W=4, N=4, G=2 mask, row by row: two separate candidates are a tree of two chains."""
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
    chains = TokenTree((5, 6, 7, 5, 8, 9), (ROOT, 0, 1, ROOT, 3, 4), (1.0,) * 6)
    tree = tree_tensors(torch.tensor(chains.tokens), torch.tensor(tree_parents(chains, 6)), torch.tensor(6), 3)
    assert torch.equal(layout.allowed(tree), expected)
    assert layout.positions(tree).tolist() == [0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 1, 2, 3, 1, 2, 3]


def test_mask_drawn_in_docs():
    """The W=3, N=3 example of docs/algorithm.md: a branching tree of five nodes padded to six."""
    drawn = """
x...........
xx..........
xxx.........
x..x........
xx..x.......
xxx..x......
x.....x.....
x......x....
x.....x.x...
x.....x..x..
x.....x.x.x.
x..........x"""
    expected = torch.tensor([[ch == "x" for ch in line] for line in drawn.split()])
    layout = StepLayout.build(LookaheadConfig(window=3, ngram=3, guesses=0, candidate_length=3, tree_nodes=6))
    branching = TokenTree((11, 12, 13, 14, 15), (ROOT, ROOT, 0, 0, 2), (1.0,) * 5)
    tree = tree_tensors(torch.tensor([*branching.tokens, 0]), torch.tensor(tree_parents(branching, 6)),
                        torch.tensor(5), 3)
    assert torch.equal(layout.allowed(tree), expected)
    assert layout.positions(tree).tolist() == [0, 1, 2, 1, 2, 3, 1, 1, 2, 2, 3, 1]
    assert tree.valid.tolist() == [True] * 5 + [False]


def test_pool_cuts_and_pads_continuations_to_the_candidate_length():
    from lookahead_decoding.drafting.ngram_pool import NGramPool

    pool = NGramPool(continuation_length=4, capacity=3)
    pool.add(7, [1, 2])  # a window n-gram shorter than K: padded with its last token
    pool.add(7, [1, 2, 3, 4, 5, 6])  # longer than K: cut
    pool.add_ngrams([7, 9, 8, 7, 6])  # text n-grams are K + 1 tokens long
    assert pool.lookup(7) == [(9, 8, 7, 6), (1, 2, 3, 4), (1, 2, 2, 2)]
