"""Drafting on the device: the template, the table's drafts and updates, and exact decoding through such steps."""

import collections
import functools
import itertools

import pytest
import torch
from conftest import VOCAB, greedy_reference, tiny_model
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lookahead_decoding as ld
from lookahead_decoding.device_drafts import (
    COPY, COPY_MATCH, ISOLATED, POOL, RANK_ACCEPTANCE, SEPARATOR, TOP_K, WINDOW_SPREAD, DeviceDrafter, TemplateShape,
    copy_length, draft_template, template_capacity,
)
from lookahead_decoding.config import AUTOREGRESSIVE, DEVICE_TREE_NODES
from lookahead_decoding.drafting.base import NoDrafts
from lookahead_decoding.drafting.tree import EMPTY_TREE
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.model_adapter import ModelAdapter
from lookahead_decoding.row_sampler import RowSampler
from lookahead_decoding.sampling_params import SamplingParams
from lookahead_decoding.scheduler import BatchScheduler, Request
from lookahead_decoding.step import EagerStep
from lookahead_decoding.tuning import StepPlan, device_drafting
from lookahead_decoding.window import JacobiWindow

DEVICE_SHAPE = ld.LookaheadConfig(1, 2, 1, candidate_length=4, tree_nodes=10, device_drafts=True)
# With a Jacobi window and its n-gram pool on the device: 2 of the pool's trigrams per step.
WINDOW_SHAPE = ld.LookaheadConfig(3, 3, 2, candidate_length=4, tree_nodes=14, device_drafts=True)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(nodes=st.integers(0, 40), max_depth=st.integers(1, 5), pool_chains=st.integers(0, 3),
       pool_length=st.integers(1, 4))
def test_the_template_is_the_likeliest_nodes_of_the_rank_tree_a_copying_chain_and_the_pools_chains(
        nodes, max_depth, pool_chains, pool_length):
    pool = pool_chains * pool_length
    assume(pool <= nodes <= template_capacity(max_depth, pool))
    template = draft_template(nodes, max_depth, pool_chains, pool_length)
    chain = copy_length(nodes - pool, max_depth)
    ranked = nodes - pool - chain
    assert len(template.parents) == nodes and chain == min(max_depth, (nodes - pool) // 2)
    # The chains: the copying one, then one per n-gram of the pool, each one path down from the current token.
    first = ranked
    for rank, length in [(COPY, chain), *[(POOL, pool_length)] * pool_chains]:
        assert template.ranks[first : first + length] == (rank,) * length
        assert template.depths[first : first + length] == tuple(range(1, length + 1))
        assert template.parents[first : first + length] == tuple([-1, *range(first, first + length - 1)][:length])
        first += length
    # Brute force: every path of ranks up to max_depth, its probability the product of the ranks' priors.
    paths = [ranks for depth in range(1, max_depth + 1) for ranks in itertools.product(range(TOP_K), repeat=depth)]
    probability = {ranks: functools.reduce(lambda p, r: p * RANK_ACCEPTANCE[r], ranks, 1.0) for ranks in paths}
    kept = []
    for node, (parent, rank) in enumerate(zip(template.parents[:ranked], template.ranks)):
        assert parent < node  # parents first
        kept.append((kept[parent] if parent >= 0 else ()) + (rank,))
        assert len(kept[-1]) == template.depths[node] <= max_depth
    assert len(set(kept)) == len(kept) == ranked <= len(paths)
    best = sorted(probability.values(), reverse=True)[: len(kept)]
    assert sorted((probability[path] for path in kept), reverse=True) == pytest.approx(best)


def copied_reference(text: list[int], end: int, count: int, ring: list[int] | None = None,
                     ring_end: int = 0) -> list[int]:
    """What copying drafts, one row at a time in Python: the continuation of the latest earlier occurrence of the
    longest suffix (up to COPY_MATCH tokens) of text[: end + 1], extended with its period past the end; or, where
    the suffix matches the memory's `ring` (newest text ending before `ring_end`) for longer, the continuation of
    its newest such occurrence there, separators drafting the current token."""
    def suffix_length(haystack: list[int], i: int) -> int:
        length = 0
        while length < COPY_MATCH and length <= min(i, end) and haystack[i - length] == text[end - length]:
            length += 1
        return length

    best, best_length = None, 0
    for i in range(end):
        length = suffix_length(text, i)
        if length and length >= best_length:
            best, best_length = i, length
    if best is None:
        drafted = [text[end]] * count
    else:
        extended = list(text[: end + 1])
        while len(extended) < best + 1 + count:
            extended.append(extended[len(extended) - (end - best)])
        drafted = extended[best + 1 : best + 1 + count]
    if ring:
        size = len(ring)
        newest_first = sorted(range(size), key=lambda i: (ring_end - 1 - i) % size)
        length, at = max(((suffix_length(ring, i), i) for i in newest_first), key=lambda pair: pair[0])
        if length > best_length:
            drafted = [ring[(at + 1 + c) % size] for c in range(count)]
    return [text[end] if token == SEPARATOR else token for token in drafted]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(texts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=24), min_size=1, max_size=4),
       count=st.integers(1, 6), stale=st.integers(0, 3))
def test_copying_drafts_what_followed_the_latest_longest_match(texts, count, stale):
    drafter = DeviceDrafter(4, torch.device("cpu"), [], rows=len(texts), length=30)
    drafter.text.fill_(stale)  # what lies past a row's text never counts
    for row, text in enumerate(texts):
        drafter.write_text(torch.arange(len(text))[None], torch.tensor([text]), torch.tensor([row]))
    drafted = drafter.copy_drafts(torch.tensor([len(text) - 1 for text in texts]), count).tolist()
    assert drafted == [copied_reference(text, len(text) - 1, count) for text in texts]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(texts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=3),
       requests=st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=9), max_size=5),
       shares=st.lists(st.booleans(), min_size=3, max_size=3), count=st.integers(1, 5))
def test_rows_that_share_the_memory_copy_from_it_where_it_matches_longer(texts, requests, shares, count):
    drafter = DeviceDrafter(4, torch.device("cpu"), [], rows=len(texts), length=20, memory_tokens=16)
    memory = ld.DraftMemory(max_requests=8)
    for request in requests:  # written as the scheduler does: the memory first, then its ring
        memory.add(request)
        drafter.remember(memory, request)
    ring, ring_end = drafter.memory.tolist(), int(drafter.memory_end)
    for row, text in enumerate(texts):
        drafter.write_text(torch.arange(len(text))[None], torch.tensor([text]), torch.tensor([row]))
        drafter.share_memory(row, shares[row])
    drafted = drafter.copy_drafts(torch.tensor([len(text) - 1 for text in texts]), count).tolist()
    assert drafted == [copied_reference(text, len(text) - 1, count, ring if shares[row] else None, ring_end)
                       for row, text in enumerate(texts)]


def test_the_ring_mirrors_its_memory_and_is_rebuilt_for_another_one():
    drafter = DeviceDrafter(10, torch.device("cpu"), [], memory_tokens=12)
    memory = ld.DraftMemory(max_requests=2)
    for request in ([1, 2, 3], [4, 5], [6, 7, 8, 9]):
        memory.add(request)
        drafter.remember(memory, request)
    # A ring of 12: the three texts and their separators (12 tokens) fill it once, oldest first.
    assert drafter.memory.tolist() == [1, 2, 3, -1, 4, 5, -1, 6, 7, 8, 9, -1] and int(drafter.memory_end) == 0
    other = ld.DraftMemory()
    other.add([5, 5])
    drafter.mirror(other)  # another memory: its requests only
    assert drafter.memory.tolist()[:3] == [5, 5, -1] and set(drafter.memory.tolist()[3:]) == {-1}
    memory.add([3, 3])  # given a request elsewhere: the next `remember` rebuilds from what it holds (2 requests)
    memory.add([2, 2])
    drafter.remember(memory, [2, 2])
    assert drafter.memory.tolist()[:6] == [3, 3, -1, 2, 2, -1]


def test_a_draft_follows_the_pairs_seen_the_single_tokens_elsewhere_and_copies_on_its_chain():
    shape = ld.LookaheadConfig(1, 2, 1, candidate_length=4, tree_nodes=12, device_drafts=True)
    drafter = DeviceDrafter(50, torch.device("cpu"), [shape], rows=3, length=16)
    generator = torch.Generator().manual_seed(0)
    drafter.table.copy_(torch.randint(0, 50, (50, TOP_K), generator=generator))
    # Teach it the pairs after a few (token before, token): their own rows, unlike the one-token table's. Every
    # row learns the same, so its own tables hold what the shared ones do.
    befores, tokens = torch.tensor([[3, 9, 17]]).expand(3, -1), torch.tensor([[17, 42, 5]]).expand(3, -1)
    drafter.learn(tokens, befores, torch.randn(1, 3, 50, generator=generator).expand(3, -1, -1))
    pairs = {(b, t): drafter.pair_table[drafter._pair(torch.tensor(b), torch.tensor(t))[1]].tolist()
             for b, t in zip(befores[0].tolist(), tokens[0].tolist())}
    current, before = torch.tensor([17, 42, 8]), torch.tensor([3, 9, 8])
    texts = [[3, 17, 1, 2, 3, 17], [30, 31, 9, 42], [8, 8]]
    for row, text in enumerate(texts):
        drafter.write_text(torch.arange(len(text))[None], torch.tensor([text]), torch.tensor([row]))
    ends = torch.tensor([len(text) - 1 for text in texts])
    template = draft_template(12, 4)
    drafted = drafter.draft(current, before, ends, shape).tolist()
    for row, (token, token_before) in enumerate(zip(current.tolist(), before.tolist())):
        chain = [node for node, rank in enumerate(template.ranks) if rank == COPY]
        assert [drafted[row][node] for node in chain] == copied_reference(texts[row], ends[row], len(chain))
        for node, (parent, rank) in enumerate(zip(template.parents, template.ranks)):
            if rank == COPY:
                continue
            parent_token = token if parent < 0 else drafted[row][parent]
            grandparent = template.parents[parent] if parent >= 0 else None
            pair_before = token_before if parent < 0 else token if grandparent < 0 else drafted[row][grandparent]
            row_of = pairs.get((pair_before, parent_token), drafter.table[parent_token].tolist())
            assert drafted[row][node] == row_of[rank]
    assert drafted[0][0] == pairs[3, 17][0] and drafted[1][0] == pairs[9, 42][0]  # the pairs were used
    assert [drafted[0][node] for node in chain] == [1, 2, 3, 17]  # the copy of what followed 3 17


def test_a_row_drafts_first_from_what_its_own_request_taught():
    """Every row of a batch writes the shared tables, where the last row's write of a token wins; a row's own
    tables hold its current request's writes alone, and its drafts follow them first. A new request in the row
    starts from the shared tables again."""
    vocab, shape = 50, ld.LookaheadConfig(1, 2, 1, candidate_length=3, tree_nodes=8, device_drafts=True)
    drafter = DeviceDrafter(vocab, torch.device("cpu"), [shape], rows=2, length=16)
    logits = torch.randn(2, 1, vocab, generator=torch.Generator().manual_seed(4))
    drafter.learn(torch.tensor([[7], [7]]), torch.tensor([[1], [2]]), logits)  # token 7 in both rows' texts
    tops = [logits[row, 0].topk(TOP_K).indices.tolist() for row in range(2)]
    assert drafter.table[7].tolist() == tops[1] != tops[0]  # the shared table kept the last row's write
    template = draft_template(8, 3)
    firsts = [(node, rank) for node, (rank, depth) in enumerate(zip(template.ranks, template.depths))
              if depth == 1 and rank >= 0]
    current, before, ends = torch.tensor([7, 7]), torch.tensor([3, 3]), torch.tensor([0, 0])  # pair (3, 7): unseen
    drafted = drafter.draft(current, before, ends, shape)
    assert [[drafted[row, node].item() for node, _ in firsts] for row in range(2)] == \
        [[tops[row][rank] for _, rank in firsts] for row in range(2)]
    # A sampled row's drafts read the same tables (with no noise, its order is the scores': the same drafts).
    assert drafter.draft(current, before, ends, shape, torch.zeros(2, 3, vocab)).tolist() == drafted.tolist()
    drafter.start_requests(torch.tensor([0]))
    drafted = drafter.draft(current, before, ends, shape)
    assert [drafted[0, node].item() for node, _ in firsts] == [tops[1][rank] for _, rank in firsts]


def test_a_sampled_rows_drafts_follow_its_draws_as_the_tables_scores_would_make_them():
    """A sampled row draws argmax(scores / T + noise); its drafts rank the tables' next tokens by score + T * noise
    of the node's position, so that rank 0 is the row's draw there were the tables' scores the model's. A greedy
    row keeps the tables' order."""
    vocab, shape = 50, ld.LookaheadConfig(1, 2, 1, candidate_length=4, tree_nodes=12, device_drafts=True)
    drafter = DeviceDrafter(vocab, torch.device("cpu"), [shape], rows=2, length=16)
    generator = torch.Generator().manual_seed(3)
    every = torch.arange(vocab)[None]
    drafter.learn(every.expand(2, -1), every.expand(2, -1),  # pairs (t, t) only, the same in both rows
                  2 * torch.randn(1, vocab, vocab, generator=generator).expand(2, -1, -1))
    sampler = RowSampler(2, vocab, torch.device("cpu"))
    sampler.start_rows({0: SamplingParams(), 1: SamplingParams(temperature=0.8, seed=11)})
    current, before, ends = torch.tensor([7, 7]), torch.tensor([1, 1]), torch.tensor([5, 5])
    noise = sampler.tree_noise(ends, 4)[:, :4]  # the race noise times the row's temperature
    drafted = drafter.draft(current, before, ends, shape, noise)
    greedy = drafter.draft(current, before, ends, shape)
    assert drafted[0].tolist() == greedy[0].tolist()
    template = draft_template(12, 4)
    for node, (parent, rank, depth) in enumerate(zip(template.parents, template.ranks, template.depths)):
        if rank == COPY:
            continue
        parent_token = 7 if parent < 0 else drafted[1, parent].item()
        grandparent_token = 1 if parent < 0 else 7 if template.parents[parent] < 0 else \
            drafted[1, template.parents[parent]].item()
        key, slot = drafter._pair(torch.tensor(grandparent_token), torch.tensor(parent_token))
        seen = drafter.pair_keys[slot] == key
        followers = drafter.pair_table[slot] if seen else drafter.table[parent_token]
        scores = drafter.pair_scores[slot] if seen else drafter.table_scores[parent_token]
        order = (scores + noise[1, depth - 1, followers]).argsort(descending=True)
        assert drafted[1, node] == followers[order[rank]]
    # Rank 0 at depth 1 is the sampler's own draw at the position after the current token, from the table's scores.
    first = template.ranks.index(0)
    logits = torch.full((2, 1, vocab), -float("inf"))
    logits[:, 0, drafter.table[7]] = drafter.table_scores[7]
    assert drafted[1, first] == sampler.choose(logits, ends[:, None] + 1)[1, 0]
    assert drafted[1].tolist() != greedy[1].tolist()  # the draws moved some drafts


def test_sampled_rows_accept_more_of_drafts_that_follow_their_draws(monkeypatch):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    prompts = [(torch.randint(0, VOCAB, (4,), generator=generator).tolist() * 10)[:30] for _ in range(4)]
    shape = ld.LookaheadConfig(1, 2, 1, candidate_length=4, tree_nodes=16, device_drafts=True)
    run = functools.partial(ld.generate, model, prompts, 48, shape, do_sample=True, temperature=0.9, seed=[1, 2, 3, 4],
                            isolated=True)
    following = run()
    by_score = DeviceDrafter.draft
    monkeypatch.setattr(DeviceDrafter, "draft", lambda self, *args, noise=None: by_score(self, *args[:4]))
    ranked_by_score = run()
    assert [row.tokens for row in following.rows] == [row.tokens for row in ranked_by_score.rows]
    assert following.stats.tokens_per_step > ranked_by_score.stats.tokens_per_step


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.integers(1, 3), window=st.integers(2, 4), levels=st.integers(1, 3), guesses=st.integers(1, 3),
       data=st.data())
def test_the_device_window_iterates_as_the_hosts_and_its_pool_keeps_the_latest_new_ngrams(rows, window, levels,
                                                                                          guesses, data):
    vocab = 12  # few tokens: n-grams repeat, so the pool meets n-grams it has
    shape = ld.LookaheadConfig(window, levels + 1, guesses, candidate_length=levels, tree_nodes=guesses * levels,
                               device_drafts=True)
    drafter = DeviceDrafter(vocab, torch.device("cpu"), [shape], rows=rows)
    start = data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows * (levels * window - 1),
                               max_size=rows * (levels * window - 1)))
    drafter.windows[window, levels].copy_(torch.tensor(start).view(rows, -1))
    hosts = []
    for row in range(rows):  # the host's window, started from the same tokens
        host = JacobiWindow(window, levels, None)
        tokens = start[row * (levels * window - 1) : (row + 1) * (levels * window - 1)]
        host.levels = [tokens[: window - 1]] + [tokens[window - 1 + l * window : window - 1 + (l + 1) * window]
                                                for l in range(levels - 1)]
        hosts.append(host)
    pool: dict[int, list] = {}  # the reference: each key's n-grams in the order they were new
    for _ in range(data.draw(st.integers(1, 4))):
        current = data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows))
        new_level = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=window, max_size=window),
                                       min_size=rows, max_size=rows))
        ngrams = [ngram for row, host in enumerate(hosts) for ngram in host.advance(current[row], new_level[row])]
        new = [(key, rest) for key, rest in dict.fromkeys(ngrams) if rest not in pool.get(key, [])]
        assume(max(collections.Counter(key for key, _ in new).values(), default=0) <= guesses)  # (see `advance`)
        for key, rest in new:
            pool.setdefault(key, []).append(rest)
        drafter.advance(window, levels, torch.tensor(current), torch.tensor(new_level))
        assert drafter.window_tokens(window, levels).tolist() == [host.tokens() for host in hosts]
    for key in range(vocab):
        kept = pool.get(key, [])
        assert drafter.pool_next[levels][key] == len(kept)
        newest = drafter.pool_drafts(torch.tensor([key]), levels, guesses, levels).view(guesses, levels).tolist()
        expected = [list(rest) for rest in kept[::-1][:guesses]]
        assert newest == expected + [[key] * levels] * (guesses - len(expected))  # none yet: the current token


def test_a_step_with_a_device_window_drafts_the_pools_newest_ngrams_on_its_chains():
    shape = ld.LookaheadConfig(3, 3, 2, candidate_length=2, tree_nodes=8, device_drafts=True)
    drafter = DeviceDrafter(20, torch.device("cpu"), [shape], rows=2, length=8)
    template = draft_template(*TemplateShape.of(shape))
    pool_nodes = [node for node, rank in enumerate(template.ranks) if rank == POOL]
    assert len(pool_nodes) == 4
    drafter.windows[3, 2].copy_(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]))
    drafter.advance(3, 2, torch.tensor([0, 11]), torch.tensor([[12, 13, 14], [15, 16, 17]]))
    # Columns: (0; 3 12) (1; 4 13) (2; 5 14) for row 0, (11; 8 15) (6; 9 16) (7; 10 17) for row 1.
    drafted = drafter.draft(torch.tensor([0, 6]), torch.tensor([0, 0]), torch.tensor([0, 0]), shape)
    assert [drafted[0, node].item() for node in pool_nodes] == [3, 12, 0, 0]  # one n-gram for 0, none more
    assert [drafted[1, node].item() for node in pool_nodes] == [9, 16, 6, 6]


def test_a_row_starts_its_device_window_from_its_own_prompt(llama):
    runner = StaticStep(llama, WINDOW_SHAPE, 64, batch_size=3, prefill_chunk=4)
    prompts = {0: [5, 6, 7, 8, 9, 10], 2: [11, 12]}
    runner.prefill_rows(prompts)
    width = WINDOW_SHAPE.levels * WINDOW_SHAPE.window - 1
    window = runner.drafter.window_tokens(WINDOW_SHAPE.window, WINDOW_SHAPE.levels)
    for row, prompt in prompts.items():
        assert window[row].tolist() == [prompt[(i * WINDOW_SPREAD + len(prompt)) % len(prompt)] for i in range(width)]
    assert window[1].tolist() == [0] * width  # a row that did not start keeps its window
    left = window[0].clone()
    runner.prefill_rows({2: [20, 21, 22]})
    assert window[0].tolist() == left.tolist() and set(window[2].tolist()) <= {20, 21, 22}


def test_a_prompt_teaches_the_tables_what_follows_each_of_its_tokens(llama):
    """A prefill learns as a step does: after each prompt token, and each pair, the model's top-k next tokens, in
    the shared tables and in the row's own. A row that rides along in the prefill learns nothing, nor does a chunk's
    padding."""
    runner = StaticStep(llama, DEVICE_SHAPE, 64, batch_size=4, prefill_chunk=4)
    prompts = {0: [5, 6, 7, 8, 9, 10], 1: [20, 21, 22], 2: [30, 31]}  # distinct tokens: no write replaces another
    runner.prefill_rows(prompts)  # 4 entries (row 3 rides along); the second chunk of row 0 is padded with 0s
    drafter, own = runner.drafter, runner.drafter.row_tables
    for row, prompt in prompts.items():
        tops = llama(torch.tensor([prompt])).logits[0].topk(TOP_K).indices.tolist()
        for position, token in enumerate(prompt):
            assert drafter.table[token].tolist() == own.followers[own.bases[row, 0] + token].tolist() == tops[position]
            if position:
                key, slot = drafter._pair(torch.tensor(prompt[position - 1]), torch.tensor(token))
                assert drafter.pair_keys[slot] == key and drafter.pair_table[slot].tolist() == tops[position]
    assert drafter.table[0].tolist() == [0] * TOP_K  # the padding's token
    stride = own.bases[1, 0]
    assert own.stamps[own.bases[3, 0] : own.bases[3, 0] + stride].eq(0).all()  # the row riding along


def test_the_tables_learn_what_follows_every_token_of_the_device_window(llama):
    runner = StaticStep(llama, WINDOW_SHAPE, 64)
    history = [1, 2, 3, 4]
    history += runner.prefill_rows({0: list(history)})[0].committed
    window = runner.drafter.window_tokens(WINDOW_SHAPE.window, WINDOW_SHAPE.levels)
    window.copy_(torch.arange(40, 40 + window.shape[1])[None])  # tokens no tree node or the text holds
    runner.step(0, [history[-1]] * WINDOW_SHAPE.tokens_per_step, EMPTY_TREE, history)
    levels = [[history[-1], 40, 41], [42, 43, 44]]  # level 0 (the current token first), level 1
    befores = [[history[-2], history[-1], 40], levels[0]]  # left of it on level 0, below it above
    for token, before in zip(levels[0][1:] + levels[1], befores[0][1:] + befores[1]):
        key, slot = runner.drafter._pair(torch.tensor(before), torch.tensor(token))
        assert runner.drafter.pair_keys[slot] == key
        assert runner.drafter.pair_table[slot].tolist() == runner.drafter.table[token].tolist()


def test_the_tables_keep_the_latest_top_k_after_each_token_and_pair():
    drafter = DeviceDrafter(30, torch.device("cpu"), [])
    logits = torch.randn(2, 3, 30, generator=torch.Generator().manual_seed(1))
    tokens, befores = torch.tensor([[4, 5, 6], [7, 8, 9]]), torch.tensor([[1, 4, 5], [2, 7, 8]])
    drafter.learn(tokens, befores, logits)
    for row, column in itertools.product(range(2), range(3)):
        scores, top = logits[row, column].topk(TOP_K)
        assert drafter.table[tokens[row, column]].tolist() == top.tolist()
        assert drafter.table_scores[tokens[row, column]].tolist() == scores.tolist()
        key, slot = drafter._pair(befores[row, column], tokens[row, column])
        assert drafter.pair_keys[slot] == key and drafter.pair_table[slot].tolist() == top.tolist()
        assert drafter.pair_scores[slot].tolist() == scores.tolist()
    assert not drafter.table[10].any()  # untouched tokens keep their (empty) drafts
    assert (drafter.pair_keys >= 0).sum() == 6


def test_a_token_or_pair_slot_written_twice_in_one_step_keeps_its_last_write():
    """The last row's, and in it the last column's: in order, as a Python dict would keep them. Pairs (b, t) and
    (b + 256, t) share a slot here (their keys are 2**18 apart); the slot keeps the key and the top-k of one write."""
    vocab = 1024
    drafter = DeviceDrafter(vocab, torch.device("cpu"), [])
    logits = torch.randn(3, 4, vocab, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([[5, 6, 5, 9], [5, 7, 6, 5], [8, 5, 6, 9]])
    befores = torch.tensor([[1, 5, 257, 3], [257, 5, 7, 1], [2, 8, 513, 769]])
    table, pairs = {}, {}
    for row, column in itertools.product(range(3), range(4)):
        scores, top = logits[row, column].topk(TOP_K)
        table[tokens[row, column].item()] = top.tolist(), scores.tolist()
        key, slot = drafter._pair(befores[row, column], tokens[row, column])
        pairs[slot.item()] = key.item(), top.tolist(), scores.tolist()
    assert len(pairs) < tokens.numel() - 1  # collisions as well as repeats
    drafter.learn(tokens, befores, logits)
    for token, (top, scores) in table.items():
        assert drafter.table[token].tolist() == top and drafter.table_scores[token].tolist() == scores
    for slot, (key, top, scores) in pairs.items():
        assert drafter.pair_keys[slot] == key
        assert drafter.pair_table[slot].tolist() == top and drafter.pair_scores[slot].tolist() == scores
    assert (drafter.pair_keys >= 0).sum() == len(pairs) and drafter.pair_table.shape[0] == drafter.pair_keys.shape[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("shape", [DEVICE_SHAPE, WINDOW_SHAPE], ids=["tree", "window"])
def test_steps_that_draft_on_the_device_give_greedy_tokens_and_accept_drafts(arch, shape):
    model = tiny_model(arch)
    prompts = [[5, 6, 7] * 4, [1, 2, 3, 4, 5]]
    out = ld.generate(model, prompts, 40, shape)
    for prompt, row in zip(prompts, out.rows):
        assert row.tokens == greedy_reference(model, torch.tensor([prompt]), 40)[0].tolist()
    assert out.stats.tokens_per_step > 1.0  # the table learned enough of the text to be right sometimes
    assert set(out.stats.shape_steps) == {"device drafts B=10 K=4" if shape is DEVICE_SHAPE else
                                          "device drafts W=3 N=3 G=2 B=14 K=4"}


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("shape", [DEVICE_SHAPE, WINDOW_SHAPE], ids=["tree", "window"])
def test_refills_budgets_and_eos_through_steps_that_draft_on_the_device(pipelined, shape):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist() for n in (3, 9, 5, 12, 4)]
    prompts[2] = prompts[2][:2] * 5  # repetitive: long acceptances
    budgets = [30, 6, 25, 3, 17]
    eos = greedy_reference(model, torch.tensor([prompts[0]]), 30)[0, len(prompts[0]) + 12].item()
    runner = StaticStep(model, shape, 96, batch_size=2, pipeline=pipelined)
    chains, chain = [], runner.chain
    runner.chain = lambda *args: chains.append(args) or chain(*args)
    out = ld.generate(model, prompts, budgets, shape, runner=runner, eos_token_id=eos)
    for prompt, budget, row in zip(prompts, budgets, out.rows):
        expected = greedy_reference(model, torch.tensor([prompt]), budget, eos_token_id=eos)[0].tolist()
        assert row.tokens == expected
    assert bool(chains) == pipelined


@pytest.mark.parametrize("pipelined", [False, True])
def test_the_engine_keeps_each_rows_text_on_the_device_as_its_cache_holds_it(pipelined):
    model = tiny_model("llama")
    prompts = [[3, 4, 5, 6] * 3, [9, 2, 7]]
    runner = StaticStep(model, DEVICE_SHAPE, 96, batch_size=2, pipeline=pipelined)
    out = ld.generate(model, prompts, [40, 25], DEVICE_SHAPE, runner=runner)
    for row, (prompt, result) in enumerate(zip(prompts, out.rows)):
        cached = result.tokens[:-1]  # the prompt and the new tokens but the last, not yet run through the model
        assert runner.drafter.text[row, : len(cached)].tolist() == cached
        assert runner.lengths[row] >= len(cached)  # (a last step may accept past the budget)


def test_plain_steps_of_an_engine_that_drafts_on_the_device_teach_its_tables(llama):
    runner = StaticStep(llama, [AUTOREGRESSIVE, DEVICE_SHAPE], 64)
    history = [5, 6, 7, 8]
    history += runner.prefill_rows({0: list(history)})[0].committed
    before, current = history[-2:]
    outcome = runner.step(0, [current], EMPTY_TREE, history)  # plain
    top = outcome.scores[0].topk(TOP_K).indices.tolist()  # the logits that chose the token after `current`
    assert runner.drafter.table[current].tolist() == top
    key, slot = runner.drafter._pair(torch.tensor(before), torch.tensor(current))
    assert runner.drafter.pair_keys[slot] == key and runner.drafter.pair_table[slot].tolist() == top


def test_a_request_copies_on_the_device_from_earlier_requests_of_its_memory():
    model = tiny_model("llama")
    prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = greedy_reference(model, torch.tensor([prompt]), 40)[0].tolist()
    second_steps = {}
    for memory in (None, ld.DraftMemory()):
        runner = StaticStep(model, DEVICE_SHAPE, 96)
        for _ in range(2):  # the same request twice: the second one's text is all in the memory
            out = ld.generate(model, [prompt], 40, DEVICE_SHAPE, runner=runner, memory=memory)
            assert out.rows[0].tokens == expected
        second_steps[memory is not None] = out.stats.steps
        assert bool(runner.drafter.memory_rows.any()) == (memory is not None)  # no memory, no row reads the ring
    assert second_steps[True] < second_steps[False]


def decode_in_turn(runners_and_memories, prompts, new_tokens=40):
    """Each prompt through `ld.generate` on its (runner, memory), in order (memory ISOLATED: isolated=True): each
    one's (tokens, steps)."""
    outs = [ld.generate(runner.adapter.model, [prompt], new_tokens, DEVICE_SHAPE, runner=runner,
                        **({"isolated": True} if memory is ISOLATED else {"memory": memory}))
            for (runner, memory), prompt in zip(runners_and_memories, prompts)]
    return [(out.rows[0].tokens, out.stats.steps) for out in outs]


def test_the_device_tables_that_requests_with_a_memory_teach_are_the_memorys():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(5)
    first, between, last = (torch.randint(0, VOCAB, (10,), generator=generator).tolist() for _ in range(3))
    engine = functools.partial(StaticStep, model, DEVICE_SHAPE, 96)
    alone = decode_in_turn([(engine(), None)], [last])[0]
    runner = engine()
    after_first = decode_in_turn([(runner, None), (runner, None)], [first, last])[1]
    assert after_first != alone  # requests without a memory share the engine's tables
    runner = engine()
    taught = decode_in_turn([(runner, ld.DraftMemory()), (runner, None)], [first, last])[1]
    assert taught == alone  # the engine's own tables learned nothing from the memory's request
    assert decode_in_turn([(runner, None)], [last])[0] != alone  # but from the request without one
    memory = ld.DraftMemory()
    taught = decode_in_turn([(runner, memory), (runner, memory)], [first, last])[1]
    assert taught != alone
    # What the memory's requests taught comes back after a request without it, and on another engine; the
    # engine's own tables come back after the memory's requests.
    memory, runner = ld.DraftMemory(), engine()
    assert decode_in_turn([(runner, memory), (runner, None), (runner, memory)], [first, between, last])[2] == taught
    memory, other = ld.DraftMemory(), engine()
    assert decode_in_turn([(engine(), memory), (other, None), (other, memory)], [first, between, last])[2] == taught
    memory, runner = ld.DraftMemory(), engine()
    assert decode_in_turn([(runner, None), (runner, memory), (runner, None)], [first, between, last])[2] \
        == after_first


def test_an_isolated_request_drafts_from_blank_tables_and_teaches_nobody():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(5)
    first, last = (torch.randint(0, VOCAB, (10,), generator=generator).tolist() for _ in range(2))
    engine = functools.partial(StaticStep, model, DEVICE_SHAPE, 96)
    alone = decode_in_turn([(engine(), None)], [last])[0]
    runner = engine()
    after_first = decode_in_turn([(runner, None), (runner, None)], [first, last])[1]
    assert after_first != alone  # what `first` taught the engine's tables
    runner, memory = engine(), ld.DraftMemory()
    turns = [(runner, None), (runner, ISOLATED), (runner, ISOLATED), (runner, None)]
    assert decode_in_turn(turns, [first, last, last, last])[1:] == [alone, alone, after_first]
    taught = decode_in_turn([(engine(), memory), (engine(), memory)], [first, last])[1]  # the memory's, from `first`
    memory = ld.DraftMemory()
    assert decode_in_turn([(runner, memory), (runner, ISOLATED), (runner, memory)], [first, last, last])[1:] \
        == [alone, taught]


def test_only_requests_that_use_the_memory_read_its_ring():
    model = tiny_model("llama")
    runner = StaticStep(model, DEVICE_SHAPE, 96, batch_size=2)
    memory = ld.DraftMemory()
    memory.add([1, 2, 3])
    scheduler = BatchScheduler(runner, StepPlan((DEVICE_SHAPE,), (1.0,)), lambda memory=None: NoDrafts(), memory)
    assert runner.drafter.memory.tolist()[:4] == [1, 2, 3, SEPARATOR]  # the ring mirrors the memory from the start
    scheduler.submit(Request([5, 6, 7], 8, tag="shares"))
    scheduler.submit(Request([5, 6, 7], 8, tag="isolated", use_memory=False))
    scheduler.step()
    assert runner.drafter.memory_rows.tolist() == [True, False]
    finished = {result.tag: result for result in scheduler.run()}
    assert memory.texts() == [[1, 2, 3], finished["shares"].tokens]  # the isolated request was not added


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_poisoned_memory_changes_no_token(pipelined):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (6, 9, 4)]
    memory = ld.DraftMemory()
    for prompt in prompts * 4:  # every prompt's end, continued at random: long matches, wrong continuations
        memory.add(prompt[-COPY_MATCH:] + torch.randint(0, VOCAB, (12,), generator=generator).tolist())
    runner = StaticStep(model, DEVICE_SHAPE, 96, batch_size=2, pipeline=pipelined)
    out = ld.generate(model, prompts, [25, 30, 20], DEVICE_SHAPE, runner=runner, memory=memory)
    for prompt, limit, row in zip(prompts, [25, 30, 20], out.rows):
        assert row.tokens == greedy_reference(model, torch.tensor([prompt]), limit)[0].tolist()


def test_a_request_without_lookahead_takes_one_token_per_step_of_a_device_drafting_plan():
    model = tiny_model("llama")
    runner = StaticStep(model, DEVICE_SHAPE, 96, batch_size=2, pipeline=True)
    prompt = [5, 6, 7] * 4
    scheduler = BatchScheduler(runner, StepPlan((DEVICE_SHAPE,), (1.0,)), lambda memory=None: NoDrafts())
    scheduler.submit(Request(list(prompt), 20, tag="on"))
    scheduler.submit(Request(list(prompt), 20, tag="off", lookahead=False))
    results = {finished.tag: finished for finished in scheduler.run()}
    expected = greedy_reference(model, torch.tensor([prompt]), 20)[0].tolist()
    assert results["on"].tokens == results["off"].tokens == expected
    assert results["off"].stats.steps == 19  # one token per step after the prefill's
    assert results["on"].stats.steps < 19


def test_a_batch_without_lookahead_takes_plain_steps_whatever_the_costs_say():
    """Whatever the costs say (here the plan's own: a tree step cheaper than a plain one; in a batch with shapes
    that draft on the host, wall times measured as it runs, where a tree step measured with few rows can look
    cheaper than a plain one measured with many), rows that do not decode with lookahead take plain steps."""
    model = tiny_model("llama")
    runner = StaticStep(model, [AUTOREGRESSIVE, DEVICE_SHAPE], 96, batch_size=2, pipeline=True)
    scheduler = BatchScheduler(runner, StepPlan((AUTOREGRESSIVE, DEVICE_SHAPE), (2.0, 1.0)),
                               lambda memory=None: NoDrafts())
    prompt = [5, 6, 7] * 4
    for tag in ("a", "b"):
        scheduler.submit(Request(list(prompt), 20, tag=tag, lookahead=False))
    expected = greedy_reference(model, torch.tensor([prompt]), 20)[0].tolist()
    assert [finished.tokens for finished in scheduler.run()] == [expected, expected]
    assert scheduler.steps_by_shape == {"plain": 19}


@pytest.mark.parametrize("host_shape", [False, True])
def test_a_batch_measures_its_step_costs_only_where_a_shape_drafts_on_the_host(host_shape):
    """A plan of plain and device-drafting steps keeps its calibrated costs (its choices then follow the rows'
    tokens, not timings); one with a host-drafted shape takes each shape's median wall time once measured."""
    model = tiny_model("llama")
    host = ld.LookaheadConfig(2, 3, 2, candidate_length=DEVICE_SHAPE.candidate_length)
    shapes = (AUTOREGRESSIVE, DEVICE_SHAPE, *((host,) if host_shape else ()))
    runner = StaticStep(model, list(shapes), 96, batch_size=2)
    plan = StepPlan(shapes, (1000.0, 1001.0, 1002.0)[: len(shapes)])  # no step of a tiny model takes a second
    scheduler = BatchScheduler(runner, plan, lambda memory=None: NoDrafts())
    for tag in ("a", "b"):
        scheduler.submit(Request([5, 6, 7] * 4, 30, tag=tag))
    list(scheduler.run())
    runs = scheduler.costs.runs
    assert sum(len(recent) for recent in scheduler.costs.recent_ms) == sum(runs) > 3  # every step was timed
    for shape, cost in enumerate(scheduler.costs.costs_ms):
        assert (cost < 1000) == (host_shape and runs[shape] >= 3)


def test_a_device_drafting_config_left_to_its_defaults_is_the_step_auto_drafts_with_at_batch_1():
    def shape(config):
        return config.window, config.ngram, config.candidate_length, config.tree_nodes

    assert shape(ld.LookaheadConfig(device_drafts=True)) == shape(device_drafting(DEVICE_TREE_NODES)) == (1, 2, 12, 63)
    # With a window, the pool's chains (G of min(N-1, K) nodes) come on top of the tree's 63 nodes.
    assert shape(ld.LookaheadConfig(8, 4, 4, device_drafts=True)) == (8, 4, 12, 63 + 4 * 3)
    assert shape(ld.LookaheadConfig(8, 4, 4, candidate_length=2, device_drafts=True)) == (8, 4, 2, 63 + 4 * 2)
    assert shape(ld.LookaheadConfig()) == (7, 5, 4, 28)  # the host's drafts: the paper's defaults, as before


def test_device_drafts_need_tree_nodes_that_fit_the_template_and_the_static_engine(llama):
    with pytest.raises(ValueError, match="LookaheadConfig.device_drafts needs tree nodes, got tree_nodes=0"):
        ld.LookaheadConfig(1, 2, 0, tree_nodes=0, device_drafts=True)
    with pytest.raises(ValueError, match=r"LookaheadConfig.device_drafts with a window needs guesses >= 1 \(the "
                                         r"n-grams of the pool verified per step\), got guesses=0"):
        ld.LookaheadConfig(3, 2, 0, tree_nodes=4, device_drafts=True)
    with pytest.raises(TypeError, match="LookaheadConfig.device_drafts must be a bool, got 1"):
        ld.LookaheadConfig(1, 2, 1, device_drafts=1)
    with pytest.raises(ValueError, match="LookaheadConfig.device_drafts drafts at most 9 tree nodes with "
                                         "candidate_length=1, window=1, ngram=2 and guesses=1, got tree_nodes=10"):
        ld.LookaheadConfig(1, 2, 1, candidate_length=1, tree_nodes=10, device_drafts=True)
    ld.LookaheadConfig(1, 2, 1, candidate_length=1, tree_nodes=9, device_drafts=True)  # 8 ranks and the copy
    with pytest.raises(ValueError, match=r"LookaheadConfig.device_drafts with candidate_length=2, window=4, ngram=4 "
                                         r"and guesses=3 verifies 6 tree nodes of the pool's n-grams \(G chains of "
                                         r"min\(N-1, K\) nodes\), so it needs tree_nodes >= 6, got tree_nodes=5"):
        ld.LookaheadConfig(4, 4, 3, candidate_length=2, tree_nodes=5, device_drafts=True)  # 3 chains of 2
    with pytest.raises(ValueError, match="steps that draft on the device run on the static engine"):
        EagerStep(ModelAdapter(llama), [DEVICE_SHAPE])
