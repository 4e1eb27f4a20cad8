"""Drafts made on the device: a tree of the model's own latest top-k predictions, filled in inside the step.

Token Recycling (arXiv 2408.08696) keeps, for every token, the model's latest top-k next tokens, and drafts by
following them from the last committed token along a fixed tree template: a node is the rank-r next token after
its parent's token. Here the table is a [V, k] tensor on the device that every such step updates from all the
rows it computed, and the template is fixed per step shape, so a row's whole draft is one gather per depth inside
the step (captured with it as a CUDA graph). A second table keys the same predictions by the pair (the token
before, the token): where the pair has been seen, a node follows it instead, since one token of context more
predicts better (docs/benchmarks.md, "H200, seventh session": 5-11% more tokens per step). Its slots are a hash of
the pair; a slot remembers which pair wrote it, so a collision falls back to the one-token table. The host drafts
nothing and the step needs from it nothing but each row's last committed token, which the step before left on the
device (the token before it is in the row's text, below): such a step can be launched before the host has read the
one before (`engine.StaticStep.chain`).

A table only knows one token ahead at a time. Text that repeats (code, quoted spans, lists) is drafted best by
copying: prompt lookup (Saxena 2023) and SuffixDecoding (arXiv 2411.04975) take what followed an earlier occurrence
of the sequence's last tokens. So the template also holds a chain that copies: every row's text lives on the device
too (`text`, written by the prefill and by every step's commit), and the chain is the continuation of the latest
earlier place where the longest suffix of the text, up to COPY_MATCH tokens, occurred (`copy_drafts`). Rows that
share a draft memory (`drafting.memory.DraftMemory`) also copy from the text of earlier requests, a ring of the
last MEMORY_TOKENS tokens of the memory's requests, wherever the suffix matches there for longer.

The drafts only decide how many tokens a step commits, never which: verification keeps exactly what the model
chooses, whatever the table holds. The tables and pools that requests with a draft memory learn are the memory's
(`learn_for`): they follow the memory from engine to engine, and the engine's own, which requests without a memory
share, learn nothing from them. Rows decoding side by side share the tables while they run, so a row would draft
after a common token what another row's text predicted there; in a batch each row therefore also keeps tables of
its own (`RowTables`), which only its current request writes, and a node follows them first.
"""

from __future__ import annotations

import functools
import heapq
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from .drafting.tree import TokenTree

# The chance that the rank-r next token of the table is right, given that its parent is, which shapes the template:
# measured over nine prompts (three each of HumanEval, GSM8K and MT-Bench; SmolLM2-135M, float32, a 120-node
# template, docs/benchmarks.md "H200, seventh session"). Rank 0 is accepted 0.4 of the times its parent is, the
# others fall off fast.
RANK_ACCEPTANCE = (0.405, 0.087, 0.035, 0.027, 0.018, 0.013, 0.010, 0.006)
TOP_K = len(RANK_ACCEPTANCE)  # next tokens the table keeps per token
PAIR_SLOTS = 1 << 18  # slots of the pair table (a pair's slot: a multiplicative hash of it)
PAIR_HASH = 1_000_003
ROW_PAIR_SLOTS = 1 << 16  # slots of each row's own pair table (a request writes a few thousand pairs)
COPY = -1  # the rank of a template node that copies: its token is the copied continuation's, at its depth
POOL = -2  # the rank of a template node that follows an n-gram of the pool (the Jacobi window's), at its depth
COPY_MATCH = 4  # the longest suffix of a row's text looked up when copying
MEMORY_TOKENS = 1 << 15  # tokens of earlier requests' text a drafter keeps to copy from (a ring)
WINDOW_SPREAD = 7919  # a new row's window takes the prompt's tokens this many positions apart (modulo its length)
SEPARATOR = -1  # ends a request's text in the ring (no match crosses it), and marks what was never written


def _nobody() -> None:
    """The learner of tables that were given back, or of blank ones for an isolated request (as a dead weakref
    would answer)."""
    return None


ISOLATED = "isolated"  # `DeviceDrafter.learn_for`: blank tables, for a request that asked for isolation


class DraftTemplate(NamedTuple):
    """A fixed tree: the table's nodes best first (every parent before its children), then the copying chain,
    then one chain per n-gram of the pool that the step verifies."""

    parents: tuple[int, ...]  # the parent node, ROOT (-1) for the children of the last committed token
    ranks: tuple[int, ...]  # which of its parent token's next tokens (0: the most likely) a node drafts, COPY or POOL
    depths: tuple[int, ...]  # 1 for the children of the last committed token


class TemplateShape(NamedTuple):
    """What fixes a step's template: its nodes, its depth K, and the pool's n-grams it verifies (chains of
    `pool_length` tokens each, 0 without a window)."""

    nodes: int
    max_depth: int
    pool_chains: int = 0
    pool_length: int = 0

    @classmethod
    def of(cls, shape) -> "TemplateShape":
        """The template of a step shape (a `LookaheadConfig` that drafts on the device): with a window, one chain
        per n-gram kept for a token (G), each as long as an n-gram's continuation (N-1) or K."""
        if not shape.has_window:
            return cls(shape.tree_nodes, shape.candidate_length)
        return cls(shape.tree_nodes, shape.candidate_length, shape.guesses, min(shape.levels, shape.candidate_length))

    @property
    def pool_nodes(self) -> int:
        return self.pool_chains * self.pool_length


def copy_length(nodes: int, max_depth: int) -> int:
    """The copying chain's nodes among a template's `nodes` (those not given to the pool): as deep as the step
    verifies, at most half of them."""
    return min(max_depth, nodes // 2)


def template_capacity(max_depth: int, pool_nodes: int = 0) -> int:
    """The most nodes a template of depth `max_depth` has: every path of ranks, the copying chain, and the pool's
    chains."""
    return sum(TOP_K**depth for depth in range(1, max_depth + 1)) + max_depth + pool_nodes


@functools.lru_cache(maxsize=None)  # one per step shape, asked for by every sequence that decodes with it
def draft_template(nodes: int, max_depth: int, pool_chains: int = 0, pool_length: int = 0) -> DraftTemplate:
    """The likeliest nodes, at most `max_depth` deep, of the tree in which the rank-r child of every node is right
    with RANK_ACCEPTANCE[r] given its parent (path probabilities never grow down a path, so taking the likeliest
    first keeps a tree), followed by the copying chain (`copy_length`) and `pool_chains` chains of `pool_length`
    nodes for the pool's n-grams: `nodes` in all, at least the pool's and at most the capacity."""
    pool_nodes = pool_chains * pool_length
    if not pool_nodes <= nodes <= template_capacity(max_depth, pool_nodes):
        raise ValueError(f"a template of depth {max_depth} with {pool_nodes} nodes for the pool holds "
                         f"{pool_nodes} to {template_capacity(max_depth, pool_nodes)} nodes, not {nodes}")
    chain = copy_length(nodes - pool_nodes, max_depth)
    ranked = table_template(nodes - pool_nodes - chain, max_depth)
    parents, ranks, depths = list(ranked.parents), list(ranked.ranks), list(ranked.depths)
    for rank, length in ((COPY, chain), *((POOL, pool_length),) * pool_chains):
        first = len(parents)
        parents += (-1, *range(first, first + length - 1))[:length]  # from the current token down
        ranks += (rank,) * length
        depths += range(1, length + 1)
    return DraftTemplate(tuple(parents), tuple(ranks), tuple(depths))


def table_template(nodes: int, max_depth: int) -> DraftTemplate:
    """The table's part of `draft_template`."""
    parents: list[int] = []
    ranks: list[int] = []
    depths: list[int] = []
    frontier = [(-RANK_ACCEPTANCE[0], -1, 0, 1)]  # (-path probability, parent, rank, depth)
    while frontier and len(parents) < nodes:
        negative, parent, rank, depth = heapq.heappop(frontier)
        parents.append(parent)
        ranks.append(rank)
        depths.append(depth)
        node = len(parents) - 1
        if rank + 1 < TOP_K:  # the next sibling: never likelier than this node
            sibling = negative / RANK_ACCEPTANCE[rank] * RANK_ACCEPTANCE[rank + 1]
            heapq.heappush(frontier, (sibling, parent, rank + 1, depth))
        if depth < max_depth:
            heapq.heappush(frontier, (negative * RANK_ACCEPTANCE[0], node, 0, depth + 1))
    return DraftTemplate(tuple(parents), tuple(ranks), tuple(depths))


@functools.lru_cache(maxsize=None)
def template_tree(shape: TemplateShape) -> TokenTree:
    """The template as the host hands a step its tree: the topology, tokens unknown until the device drafts them
    (a row whose step gets this tree drafts on the device; one that gets an empty tree decodes one token)."""
    template = draft_template(*shape)
    return TokenTree(tokens=(0,) * shape.nodes, parents=template.parents, scores=(0.0,) * shape.nodes)


def matched_lengths(text: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """For each row's suffix (suffix[:, j]: its j-th token from the end) and each position i of `text` ([rows or 1,
    L]): how many of the suffix's last tokens stand, in order, in the text right up to position i ([rows, L])."""
    length = suffix.shape[1]
    # windows[:, i, j]: the text's token j places before position i (before its start, a value that matches nothing)
    windows = torch.nn.functional.pad(text, (length - 1, 0), value=SEPARATOR - 2).unfold(1, length, 1).flip(2)
    hits = windows == suffix[:, None, :]
    # All at once rather than one token back at a time (a handful of ops, where a step is launch-bound): the first
    # miss, or all of them. (A running product over so short a last dimension is a slow scan kernel on CUDA.)
    return torch.where(hits.all(dim=2), length, (~hits).to(torch.uint8).argmax(dim=2))


def noisy_ranks(followers: torch.Tensor, scores: torch.Tensor, ranks: torch.Tensor, noise: torch.Tensor
                ) -> torch.Tensor:
    """Of each node's parent's next tokens `followers` [batch, n, k], with the model's `scores` for them (best
    first), the one of rank `ranks` [n] ([batch, n]) in the order of scores + `noise` [batch, V] of the node's
    position (a row's race noise times its temperature: a sampled row's draw there prefers its tokens in that order
    were the scores the model's; 0 for a greedy row, whose order stays the scores')."""
    drawn = scores + noise.gather(1, followers.flatten(1)).view_as(followers)
    order = drawn.argsort(dim=-1, descending=True, stable=True)
    return followers.gather(2, order.gather(2, ranks[None, :, None].expand(followers.shape[0], -1, 1)))[..., 0]


def pair_slot(key: torch.Tensor, slots: int) -> torch.Tensor:
    """A pair's slot in a pair table of `slots` slots: a multiplicative hash of its key."""
    return key * PAIR_HASH % slots


def last_writes(writer: torch.Tensor, entries: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """`entries` [n] of a table, each kept where it is last in `entries` and sent to the table's spare last entry
    elsewhere (`writer`: the table's scratch, one per entry): a token or pair written more than once in a step keeps
    its last write on every device (CUDA keeps an arbitrary one of duplicate writes). Entries where `keep` [n] is
    False are not written at all: they go to the spare entry too."""
    if keep is not None:
        entries = torch.where(keep, entries, writer.numel() - 1)
    order = torch.arange(entries.numel(), device=entries.device)
    writer.scatter_reduce_(0, entries, order, "amax", include_self=False)
    return torch.where(writer[entries] == order, entries, writer.numel() - 1)


class RowTables:
    """Each row's own tables of top-k next tokens, after a token and after a pair, written by its current request
    alone: the shared tables take every row's writes, and a row's drafts after a common token then follow another
    row's text (2-core CPU replay, 8 rows, B=63 K=12, these tables read first: 16% / 19% fewer steps on MT-Bench /
    GSM8K; docs/benchmarks.md, "Each row's own tables"). An entry counts only for the request that wrote it
    (`stamps` against `requests`), so a new request starts from blank tables without a fill. About 84 bytes a row
    per token of the vocabulary and per pair slot: 10 MB a row with SmolLM2's vocabulary, 16 MB with Llama 3's."""

    def __init__(self, vocab: int, rows: int, device: torch.device) -> None:
        self.vocab, stride = vocab, vocab + ROW_PAIR_SLOTS
        self.bases = (torch.arange(rows, device=device) * stride)[:, None]  # row r's tokens, then its pair slots
        # By entry (a last, spare one takes the writes that lose to a later one of the same step); `keys`: the pair
        # that wrote a pair slot (-1 where none; a token's entry keeps -1).
        self.followers = torch.zeros(rows * stride + 1, TOP_K, dtype=torch.int32, device=device)
        self.scores = torch.zeros(rows * stride + 1, TOP_K, device=device)
        self.stamps = torch.zeros(rows * stride + 1, dtype=torch.int32, device=device)
        self.keys = torch.full((rows * stride + 1,), -1, dtype=torch.long, device=device)
        self._writer = torch.zeros(rows * stride + 1, dtype=torch.long, device=device)
        self.requests = torch.ones(rows, dtype=torch.int32, device=device)  # each row's current request

    def start(self, rows: torch.Tensor) -> None:
        """New requests in `rows`: what their rows' tables hold stops counting."""
        self.requests[rows] += 1

    def find(self, key: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For nodes whose parent is `tokens` [batch, n] and pair `key`: whether the row's own tables know what
        follows (its pair, else its token), and the entry that does."""
        pair, current = self.bases + self.vocab + pair_slot(key, ROW_PAIR_SLOTS), self.requests[:, None]
        pair_known = (self.keys[pair] == key) & (self.stamps[pair] == current)
        token = self.bases + tokens
        return pair_known | (self.stamps[token] == current), torch.where(pair_known, pair, token)

    def learn(self, tokens: torch.Tensor, key: torch.Tensor, top: torch.Tensor, scores: torch.Tensor,
              rows: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> None:
        """Keep each row's top-k next tokens `top` (with `scores`) after its `tokens` [rows, R] and their pairs
        (`rows`: the row of each line, default every row in order; `keep`: the columns to learn, default all)."""
        bases = self.bases if rows is None else self.bases[rows]
        requests = self.requests if rows is None else self.requests[rows]
        pairs = bases + self.vocab + pair_slot(key, ROW_PAIR_SLOTS)
        entries = last_writes(self._writer, torch.cat([(bases + tokens).flatten(), pairs.flatten()]),
                              None if keep is None else keep.flatten().repeat(2))
        self.followers[entries] = top.reshape(-1, TOP_K).repeat(2, 1).int()
        self.scores[entries] = scores.float().reshape(-1, TOP_K).repeat(2, 1)
        self.stamps[entries] = requests[:, None].expand_as(tokens).flatten().repeat(2)
        self.keys[entries[tokens.numel():]] = key.flatten()


class DeviceDrafter:
    """The tables of latest top-k next tokens, every row's text, the ring of `memory_tokens` tokens of earlier
    requests' text, the Jacobi windows and n-gram pools of the shapes with a window, and the templates of `shapes`
    (the `LookaheadConfig`s that draft on the device), on the device, for a batch of `rows` rows of up to `length`
    tokens."""

    def __init__(self, vocab: int, device: torch.device, shapes: Iterable, rows: int = 1, length: int = 1,
                 memory_tokens: int = MEMORY_TOKENS) -> None:
        self.vocab, self.device = vocab, device
        # Both tables in one tensor, so that a node reads either with one gather: rows 0..V-1 are the tokens' (token
        # -> its top-k next tokens), the rest the pair slots' (slot -> the top-k next tokens after the pair that
        # wrote it last; `pair_keys`: that pair, -1: none yet). With the model's scores (logits) of those next
        # tokens, from which sampled rows' drafts guess their draws.
        # A last, spare row of each (never read) takes the writes that lose to a later one of the same step (`learn`).
        self.followers = torch.zeros(vocab + PAIR_SLOTS + 1, TOP_K, dtype=torch.long, device=device)
        self.follower_scores = torch.zeros(vocab + PAIR_SLOTS + 1, TOP_K, device=device)
        self.table, self.pair_table = self.followers[:vocab], self.followers[vocab:-1]
        self.table_scores, self.pair_scores = self.follower_scores[:vocab], self.follower_scores[vocab:-1]
        self._pair_keys = torch.full((PAIR_SLOTS + 1,), -1, dtype=torch.long, device=device)
        self.pair_keys = self._pair_keys[:-1]
        self._last_writer = torch.zeros(vocab + PAIR_SLOTS + 1, dtype=torch.long, device=device)
        self.row_tables = RowTables(vocab, rows, device) if rows > 1 else None  # (one row's writes are its own already)
        # Each row's tokens by position, as its cache holds their keys and values (past a row's length: stale).
        self.text = torch.zeros(rows, length, dtype=torch.long, device=device)
        self._positions = torch.arange(length, device=device)
        # The ring of earlier requests' text, where it is written next (the newest text ends before it), which rows
        # copy from it, and which memory it mirrors (the memory, and how many requests it had been given).
        self.memory = torch.full((memory_tokens,), SEPARATOR, dtype=torch.long, device=device)
        self.memory_end = torch.zeros((), dtype=torch.long, device=device)
        self.memory_rows = torch.zeros(rows, dtype=torch.bool, device=device)
        self._memory_positions = torch.arange(memory_tokens, device=device)
        self._written = 0  # tokens written into the ring so far
        self._mirrors: tuple[weakref.ref, int] | None = None
        # Whose the tables are: None, the engine's own (requests without a memory); else (a weakref to) the memory
        # whose requests taught them, or `_nobody`. The engine's own, while another's are held.
        self._learner: Callable[[], object] | None = None
        self._own: dict[str, torch.Tensor] = {}
        shapes = list(shapes)
        templates = {TemplateShape.of(shape) for shape in shapes}
        # Per window (W, N-1): every row's window tokens in layout order (level 0 without the current token, then
        # the levels above). Per n-gram continuation length N-1: the pool, token -> its G latest n-grams'
        # continuations (SEPARATOR: none yet; a spare row V takes the writes of n-grams it holds already, so that
        # writing needs no branch), and where each token's next n-gram goes.
        self.windows = {(shape.window, shape.levels): torch.zeros(rows, shape.levels * shape.window - 1,
                                                                  dtype=torch.long, device=device)
                        for shape in shapes if shape.has_window}
        guesses: dict[int, int] = {}
        for shape in shapes:
            if shape.has_window:
                guesses[shape.levels] = max(guesses.get(shape.levels, 0), shape.guesses)
        self.pools = {levels: torch.full((vocab + 1, count, levels), SEPARATOR, dtype=torch.long, device=device)
                      for levels, count in guesses.items()}
        self.pool_next = {levels: torch.zeros(vocab + 1, dtype=torch.long, device=device) for levels in guesses}
        # Built now, not while a step is captured as a CUDA graph.
        self._levels = {template: self._by_depth(draft_template(*template)) for template in templates}
        self._chains = {template: self._nodes_of(draft_template(*template), COPY) for template in templates}
        self._pool_nodes = {template: self._nodes_of(draft_template(*template), POOL) for template in templates}

    def _nodes_of(self, template: DraftTemplate, rank: int) -> torch.Tensor:
        return torch.tensor([node for node, r in enumerate(template.ranks) if r == rank], dtype=torch.long,
                            device=self.device)

    def _pair(self, before: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair's key and its slot in the pair table."""
        key = before * self.vocab + token
        return key, pair_slot(key, PAIR_SLOTS)

    def write_text(self, positions: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Put `tokens` [entries, n] at `positions` [entries, n] of the rows' texts (rows: [entries], the text row
        of each entry; None: entry i is row i)."""
        rows = torch.arange(tokens.shape[0], device=tokens.device) if rows is None else rows
        self.text[rows[:, None].expand_as(positions), positions] = tokens

    def copy_drafts(self, ends: torch.Tensor, count: int) -> torch.Tensor:
        """Per row, the `count` tokens [batch, count] that followed the latest earlier occurrence of the longest
        suffix (up to COPY_MATCH tokens) of the row's text up to position `ends` [batch] (the current token).
        Where the copy would run past the current token it repeats the text from the match on (a pattern that
        continues with its period). A row that shares the memory copies from the memory's newest occurrence
        instead where the suffix matches there for longer. Without any match, or where a copy from the memory
        runs past a request's end, it drafts the current token."""
        text, positions = self.text, self._positions
        ends = ends[:, None]
        back = torch.arange(COPY_MATCH, device=text.device)
        # The suffix, last token first; before the text's start, a value that matches nothing.
        suffix = torch.where(back <= ends, text.gather(1, (ends - back).clamp(min=0)), SEPARATOR - 1)
        current = text.gather(1, ends)
        match = matched_lengths(text, suffix) * (positions < ends)  # earlier occurrences only
        # The longest match, the latest among equals; scores of non-matches stay below every match's.
        best = (match * text.shape[1] + positions).argmax(dim=1, keepdim=True)
        length = match.gather(1, best)
        period = ends - best  # >= 1 where a match exists
        follow = best + 1 + torch.arange(count, device=text.device)
        follow = torch.where(follow > ends, ends - period + (follow - ends - 1) % period.clamp(min=1) + 1, follow)
        drafted = torch.where(length > 0, text.gather(1, follow.clamp(0, text.shape[1] - 1)), current)
        # The memory: the newest of its longest matches (age: tokens written since).
        ring, size = self.memory, self.memory.shape[0]
        remembered = matched_lengths(ring[None], suffix) * self.memory_rows[:, None]
        age = (self.memory_end - 1 - self._memory_positions) % size
        newest = (remembered * size - age).argmax(dim=1, keepdim=True)
        copied = ring[(newest + 1 + torch.arange(count, device=text.device)) % size]
        drafted = torch.where(remembered.gather(1, newest) > length, copied, drafted)
        return torch.where(drafted == SEPARATOR, current, drafted)

    def start_requests(self, rows: torch.Tensor) -> None:
        """New requests in `rows` [n]: their own tables start blank."""
        if self.row_tables is not None:
            self.row_tables.start(rows)

    def share_memory(self, row: int, shares: bool) -> None:
        """Whether the sequence now in `row` copies from the memory's ring."""
        self.memory_rows[row] = shares

    def mirror(self, memory) -> None:
        """Make the ring hold `memory`'s requests (a `DraftMemory`), unless it already does."""
        if self._mirrors is not None and self._mirrors[0]() is memory and self._mirrors[1] == memory.added:
            return
        self.memory.fill_(SEPARATOR)
        self._written = 0
        self._append([token for text in memory.texts() for token in (*text, SEPARATOR)])
        self._mirrors = (weakref.ref(memory), memory.added)

    def remember(self, memory, tokens: Sequence[int]) -> None:
        """Add a finished request's text, which `memory` has just been given, to the ring that mirrors it (as
        much of it as the memory keeps)."""
        if self._mirrors is None or self._mirrors[0]() is not memory or self._mirrors[1] != memory.added - 1:
            self.mirror(memory)  # it was given requests elsewhere too: all of them, afresh
            return
        self._append([*(tokens if memory.max_tokens is None else tokens[-memory.max_tokens:]), SEPARATOR])
        self._mirrors = (self._mirrors[0], memory.added)

    def _append(self, tokens: Sequence[int]) -> None:
        """Append tokens to the ring (the last that fit), overwriting the oldest: one copy from pinned host
        memory, which does not wait for the steps in flight."""
        size = self.memory.shape[0]
        tokens = tokens[-size:]
        if not tokens:
            return
        where = [(self._written + i) % size for i in range(len(tokens))]
        self._written += len(tokens)
        pinned = self.memory.device.type == "cuda"
        host = torch.tensor([[*where, self._written % size], [*tokens, 0]], pin_memory=pinned)
        update = host.to(self.memory.device, non_blocking=pinned)
        self.memory.index_copy_(0, update[0, :-1], update[1, :-1])
        self.memory_end.copy_(update[0, -1])

    def _learned(self) -> dict[str, tuple[torch.Tensor, int]]:
        """What the drafter learns from the requests it serves, by name, with each tensor's blank value."""
        return {"followers": (self.followers, 0), "follower_scores": (self.follower_scores, 0),
                "pair_keys": (self._pair_keys, -1),
                **{f"pool{levels}": (pool, SEPARATOR) for levels, pool in self.pools.items()},
                **{f"pool_next{levels}": (where, 0) for levels, where in self.pool_next.items()}}

    def learn_for(self, memory) -> None:
        """Make the tables and pools those of `memory`'s requests (a `DraftMemory`), as they were when the memory
        was last served on this device (by this drafter or another engine's; blank the first time); with None the
        engine's own, which requests without a memory share; with ISOLATED blank ones that nobody keeps, for a
        request that asked for isolation. The tables held go first to whom they were learned for."""
        if memory is not ISOLATED and self._holds(memory):
            return
        if self._learner is None:
            self._own = self._copy()
        elif (owner := self._learner()) is not None:
            self._give_back(owner)
        if memory is ISOLATED:
            kept, self._learner = {}, _nobody
        else:
            holder = None if memory is None or memory.device_holder is None else memory.device_holder()
            if holder is not None:  # another engine's drafter holds what the memory's requests taught last
                holder._give_back(memory)
            kept = self._own if memory is None else memory.device_learned.get(str(self.device), {})
            self._learner = None if memory is None else weakref.ref(memory)
            if memory is not None:
                memory.device_holder = weakref.ref(self)
        for name, (tensor, blank) in self._learned().items():
            if name in kept and kept[name].shape == tensor.shape:
                tensor.copy_(kept[name])
            else:
                tensor.fill_(blank)

    def _holds(self, memory) -> bool:
        """Whether the tables are `memory`'s (None: the engine's own)."""
        if self._learner is None:
            return memory is None
        return memory is not None and self._learner() is memory

    def _copy(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, (tensor, _) in self._learned().items()}

    def _give_back(self, memory) -> None:
        """Keep a copy of the tables in `memory`, which they were learned for; they are nobody's now."""
        memory.device_learned[str(self.device)] = self._copy()
        memory.device_holder = None
        self._learner = _nobody

    def start_windows(self, rows: torch.Tensor, lengths: torch.Tensor, starting: torch.Tensor) -> None:
        """Fill the windows of the `starting` ones of `rows` (their prompts, of `lengths` tokens, now in their
        texts) with tokens of their prompts, spread over them, as the host's window starts from prompt tokens."""
        for window in self.windows.values():
            spread = torch.arange(window.shape[1], device=rows.device) * WINDOW_SPREAD
            prompt_tokens = self.text[rows[:, None], (spread + lengths[:, None]) % lengths.clamp(min=1)[:, None]]
            window[rows] = torch.where(starting[:, None], prompt_tokens, window[rows])

    def window_tokens(self, window: int, levels: int) -> torch.Tensor:
        """Every row's Jacobi window [rows, levels * window - 1], in the step's layout order."""
        return self.windows[window, levels]

    def iterate_window(self, window: int, levels: int, ids: torch.Tensor, before: torch.Tensor,
                       logits: torch.Tensor) -> None:
        """After a step's forward, with its window rows' `ids` and `logits` ([rows, levels * window], level 0 starting
        with the current token, and [rows, levels * window, V]) and the token `before` the current one: the tables
        learn what follows each window token (after the token it follows: the one below it in its column, or on
        level 0 the one left of it), then the window advances (`advance`). Learnt after the tree's rows, where both
        wrote the window's predictions stay (docs/benchmarks.md: more tokens per step that way)."""
        rows = ids.shape[0]
        grid = ids.view(rows, levels, window)
        left = torch.cat([before[:, None], grid[:, 0, :-1]], dim=1)
        below = torch.cat([left[:, None], grid[:, :-1]], dim=1)
        self.learn(ids, below.reshape(rows, -1), logits)
        self.advance(window, levels, ids[:, 0], logits[:, -window:].argmax(dim=-1))

    def advance(self, window: int, levels: int, current: torch.Tensor, new_level: torch.Tensor) -> None:
        """One Jacobi iteration of every row's window (`window.JacobiWindow.advance`, on the device): `new_level`
        [rows, W] is the model's prediction after the last level. Each column's trajectory, from its level-0 token
        (the current token's for column 0) to the new prediction, is an n-gram that goes to the pool unless the
        pool has it already; the window then moves up one level. (More than G new n-grams of one token in one step
        overwrite each other in an order the device picks.)"""
        rows = current.shape[0]
        grid = torch.cat([current[:, None], self.windows[window, levels], new_level], dim=1).view(rows, levels + 1,
                                                                                                 window)
        keys, continuations = grid[:, 0].reshape(-1), grid[:, 1:].transpose(1, 2).reshape(-1, levels)
        pool, next_slot = self.pools[levels], self.pool_next[levels]
        # New: in neither the pool nor an earlier column of this step (rows in order); the new n-grams of one key
        # take its next slots in that order.
        same_key = keys[:, None] == keys[None, :]
        earlier = torch.ones_like(same_key).tril(-1)  # [i, j]: column j comes before column i
        repeated = (same_key & earlier & (continuations[:, None] == continuations[None, :]).all(dim=2)).any(dim=1)
        new = ~(pool[keys] == continuations[:, None, :]).all(dim=2).any(dim=1) & ~repeated
        slot = (next_slot[keys] + (same_key & earlier & new[None, :]).sum(dim=1)) % pool.shape[1]
        pool[torch.where(new, keys, self.vocab), slot] = continuations  # (the others: to the spare row)
        next_slot.index_add_(0, keys, new.long())
        self.windows[window, levels].copy_(grid[:, 1:].reshape(rows, -1)[:, 1:])

    def draft(self, current: torch.Tensor, before: torch.Tensor, ends: torch.Tensor, shape,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """Every row's tree tokens [batch, nodes] for a step of `shape` (a `LookaheadConfig` that drafts on the
        device) after its last committed token (`current`, [batch], which stands at position `ends` [batch] of its
        text), the token `before` it ([batch]) giving the first node's pair.

        `noise`: where rows sample, the race noise [batch, >= K, V] of the positions after the current token, one
        per depth, times each row's temperature (0 for greedy rows: `row_sampler.RowSampler.tree_noise`). A
        sampled row draws the argmax of its scores / temperature + noise, so the tables' next tokens are ranked by
        score + temperature * noise instead of by score alone: a node of rank r drafts what would be the row's r-th
        likeliest draw there if the tables' scores were the model's (`noisy_ranks`)."""
        template = TemplateShape.of(shape)
        nodes = template.nodes
        # Column `nodes` stands for the current token, the template's root, and column `nodes + 1` for the token
        # before it, the root's parent.
        tokens = torch.cat([current[:, None].expand(-1, nodes + 1), before[:, None]], dim=1)
        for depth, where, parents, grandparents, ranks in self._levels[template]:
            parent_tokens = tokens[:, parents]
            key, slot = self._pair(tokens[:, grandparents], parent_tokens)
            table_row = torch.where(self.pair_keys[slot] == key, self.vocab + slot, parent_tokens)  # of `followers`
            known, entry = (None, None) if self.row_tables is None else self.row_tables.find(key, parent_tokens)
            if noise is None:
                drafted = self.followers[table_row, ranks]
                if known is not None:
                    drafted = torch.where(known, self.row_tables.followers[entry, ranks], drafted)
                tokens[:, where] = drafted
            else:
                followers, scores = self.followers[table_row], self.follower_scores[table_row]
                if known is not None:
                    followers = torch.where(known[..., None], self.row_tables.followers[entry], followers)
                    scores = torch.where(known[..., None], self.row_tables.scores[entry], scores)
                tokens[:, where] = noisy_ranks(followers, scores, ranks, noise[:, depth - 1])
        chain = self._chains[template]
        if chain.numel():
            tokens[:, chain] = self.copy_drafts(ends, chain.numel())
        if template.pool_chains:
            tokens[:, self._pool_nodes[template]] = self.pool_drafts(current, shape.levels, template.pool_chains,
                                                                     template.pool_length)
        return tokens[:, :nodes]

    def pool_drafts(self, current: torch.Tensor, levels: int, count: int, length: int) -> torch.Tensor:
        """Per row, the first `length` tokens of the `count` n-grams the pool got last for the current token,
        newest first ([batch, count * length]); the current token where it has fewer."""
        pool = self.pools[levels]
        newest = self.pool_next[levels][current][:, None] - 1 - torch.arange(count, device=current.device)
        drafted = pool[current[:, None], newest % pool.shape[1], :length]  # [batch, count, length]
        return torch.where(drafted == SEPARATOR, current[:, None, None], drafted).reshape(current.shape[0], -1)

    def learn(self, tokens: torch.Tensor, befores: torch.Tensor, logits: torch.Tensor,
              rows: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> None:
        """Keep the top-k next tokens after each of `tokens` [batch, R], and after each pair (`befores`, `tokens`),
        as `logits` [batch, R, V] rank them (`rows`: the batch row of each line, default every row in order;
        `keep`: the columns to learn, default all). A token or pair slot written more than once keeps its last
        write (the last row's, and in it the last column's), whatever the device: CUDA keeps an arbitrary one of
        duplicate writes, and so two runs of one batch would draft differently."""
        scores, top = logits.topk(TOP_K, dim=-1)
        key, slot = self._pair(befores, tokens)
        entries = last_writes(self._last_writer, torch.cat([tokens.flatten(), self.vocab + slot.flatten()]),
                              None if keep is None else keep.flatten().repeat(2))
        self.followers[entries] = top.reshape(-1, TOP_K).repeat(2, 1)
        self.follower_scores[entries] = scores.float().reshape(-1, TOP_K).repeat(2, 1)
        self._pair_keys[entries[tokens.numel():] - self.vocab] = key.flatten()
        if self.row_tables is not None:
            self.row_tables.learn(tokens, key, top, scores, rows, keep)

    def _by_depth(self, template: DraftTemplate) -> list[tuple[torch.Tensor, ...]]:
        """Per depth, the depth and, as tensors, the template's nodes there that follow the tables, their parents
        and their parents' parents (the root as `nodes`, its parent as `nodes + 1`) and their ranks."""
        nodes = len(template.parents)

        def parent(node: int) -> int:
            return nodes + 1 if node == nodes else nodes if template.parents[node] < 0 else template.parents[node]

        levels = []
        for depth in range(1, max(template.depths, default=0) + 1):
            at = [node for node in range(nodes) if template.depths[node] == depth and template.ranks[node] >= 0]
            if not at:
                continue
            levels.append((depth, *(torch.tensor(values, device=self.device) for values in (
                at, [parent(n) for n in at], [parent(parent(n)) for n in at], [template.ranks[n] for n in at]))))
        return levels
