"""Each row's token choice on the device: penalties, warpers and a seeded draw, with per-row parameters.

Every computed position's token is chosen as argmax(warped scores + noise), with noise keyed by the row's seed,
the position and the token (`draws.py`); a greedy row (temperature 0) takes the argmax of its penalised scores.
Verification then compares drafts with these choices exactly as greedy verification compares them with the
argmax (`verification.verify_greedy`): a draft is accepted when it is the token the row draws there. The
committed tokens are therefore the ones plain sampling with the same seed commits, drafts or not, and each has
exactly its distribution (docs/algorithm.md, "Sampling as a seeded argmax"). Everything here is a fixed-shape
device op over all rows, so it runs inside the captured step with no host work per row.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from .draws import race_noise, seed_keys, stream_keys, token_keys
from .layout import TreeTensors
from .sampling_params import SamplingParams

_GREEDY = SamplingParams()


@torch.library.custom_op("lookahead_decoding::cumulative_sum", mutates_args=())
def cumulative_sum(values: torch.Tensor) -> torch.Tensor:
    """The cumulative sum over the last dimension, opaque to torch.compile: inductor (torch 2.11) failed to generate
    its own scan kernel over a sorted vocabulary ([1, 64, 49152] float32, H100), so a compiled step calls torch's."""
    return values.cumsum(dim=-1)


@cumulative_sum.register_fake
def _(values: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(values)


# Outside a CUDA graph, top-k / top-p first look at this many of the most likely tokens: a full sort of the
# vocabulary costs a CPU about as much as a forward of a small model's token.
HEAD_TOKENS = 256
STAGES = ("penalties", "sampling", "top_k_top_p", "min_p")


def choose_tokens(sampler: "RowSampler | None", logits: torch.Tensor, tree: TreeTensors, current: torch.Tensor,
                  config, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The token each row chooses [rows, 1 + B] after its current token (at position `current` [rows]) and after
    each node of its token tree (batched): logits [rows, 1 + B, V] in that order, for a step of `config`. The
    argmax without a sampler (greedy), else each row's draw (`RowSampler.choose_in_tree`; `noise`: its
    `tree_noise`, when the step has it already)."""
    if sampler is None:
        return logits.argmax(dim=-1)
    return sampler.choose_in_tree(logits, tree, current, config.candidate_length if config.tree_nodes else 0, noise)


def tree_positions(current: torch.Tensor, max_depth: int) -> torch.Tensor:
    """The sequence positions [rows, max_depth + 1] a tree step draws at after the current tokens (at positions
    `current` [rows]): one per depth, the current token's choice first."""
    return current[:, None] + 1 + torch.arange(max_depth + 1, device=current.device)


class RowSampler:
    """The sampling parameters of `rows` rows as device tensors, and the token counts the penalties read: how often
    each token occurs in a row's output so far, and whether it occurs in its prompt.

    `choose` runs only the stages (`STAGES`) some row uses: `stages`, kept up to date as rows start. A captured step
    is recorded for one set of stages (`engine.StaticStep.replayable` keys its graphs by it). Outside a graph, top-k
    and top-p sort only the most likely tokens when they hold every token kept; the choices are the same."""

    def __init__(self, rows: int, vocab: int, device) -> None:
        self.rows, self.vocab = rows, vocab
        zeros = lambda dtype=torch.float32: torch.zeros(rows, dtype=dtype, device=device)  # noqa: E731
        self.temperature, self.top_p, self.min_p = zeros(), zeros() + 1, zeros()
        self.repetition, self.presence, self.frequency = zeros() + 1, zeros(), zeros()
        self.top_k, self.seed_keys = zeros(torch.long), seed_keys(zeros(torch.long))
        self.output_counts = torch.zeros(rows, vocab, device=device)
        self.in_prompt = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)  # + a spare column
        self.token_keys = token_keys(vocab, device)
        self.params: list[SamplingParams] = [_GREEDY] * rows  # the host's copy, for choosing the stages
        self.stages: tuple[str, ...] = ()

    def start_rows(self, params: dict[int, SamplingParams | None]) -> None:
        """Rows that begin a new sequence (between steps, outside any graph): their parameters (None: greedy)
        and empty counts."""
        if not params:
            return
        rows = torch.tensor(list(params), device=self.seed_keys.device)
        given = [_GREEDY if p is None else p for p in params.values()]
        for row, p in zip(params, given):
            self.params[row] = p
        for tensor, values in (
            (self.temperature, [p.temperature for p in given]), (self.top_p, [p.top_p for p in given]),
            (self.min_p, [p.min_p for p in given]), (self.repetition, [p.repetition_penalty for p in given]),
            (self.presence, [p.presence_penalty for p in given]),
            (self.frequency, [p.frequency_penalty for p in given]),
            (self.top_k, [p.top_k for p in given]),
        ):
            tensor.index_copy_(0, rows, torch.tensor(values, dtype=tensor.dtype).to(tensor.device))
        seeds = torch.tensor([p.seed for p in given], dtype=torch.long).to(rows.device)
        self.seed_keys.index_copy_(0, rows, seed_keys(seeds))
        self._choose_stages()
        self.output_counts.index_fill_(0, rows, 0)
        self.in_prompt.index_fill_(0, rows, False)

    def end_rows(self, rows: Sequence[int]) -> None:
        """Rows whose sequences have ended: greedy until a new sequence starts in them, so that the stages only
        their parameters needed stop running (an idle row's tokens are discarded)."""
        for row in rows:
            self.params[row] = _GREEDY
        self._choose_stages()

    def _choose_stages(self) -> None:
        self.stages = tuple(stage for stage in STAGES if self._needs(stage))

    def _needs(self, stage: str) -> bool:
        """Whether some row uses a stage of `STAGES`."""
        if stage == "penalties":
            return any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in self.params)
        sampled = [p for p in self.params if p.samples]
        if stage == "sampling":
            return bool(sampled)
        if stage == "top_k_top_p":
            return any(p.top_k or p.top_p < 1 for p in sampled)
        return any(p.min_p for p in sampled)

    def _uses(self, stage: str) -> bool:
        return stage in self.stages

    def observe_prompt(self, ids: torch.Tensor, real: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Prompt tokens ids [rows, C] where `real` [rows, C] (bool) is set: the repetition penalty covers them.
        `rows` [n]: the ids are of these rows only (ids [n, C])."""
        # Ids that are not real go to a spare last column, so no write of False can race a write of True.
        columns = torch.where(real, ids, self.vocab)
        if rows is None:
            self.in_prompt.scatter_(1, columns, True)
        else:
            self.in_prompt.index_put_((rows[:, None], columns), self.in_prompt.new_ones(()))

    def observe_output(self, tokens: torch.Tensor, real: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Committed output tokens [rows, T] where `real` [rows, T] (bool) is set; of the rows `rows` [n] only
        (tokens [n, T]) where given."""
        counts = real.to(self.output_counts.dtype)
        if rows is None:
            self.output_counts.scatter_add_(1, tokens, counts)
        else:
            self.output_counts.index_put_((rows[:, None], tokens), counts, accumulate=True)

    def select(self, rows: torch.Tensor) -> "RowSampler":
        """A sampler of the rows `rows` [n] alone, their parameters and counts copied out: it chooses their tokens
        (`choose`) as this one would; what it observes stays its own."""
        selected = copy.copy(self)
        selected.rows = rows.shape[0]
        for name in ("temperature", "top_p", "min_p", "repetition", "presence", "frequency", "top_k", "seed_keys",
                     "output_counts", "in_prompt"):
            setattr(selected, name, getattr(self, name)[rows])
        return selected

    def observe_step(self, committed: torch.Tensor, accepted: torch.Tensor, decoding: torch.Tensor) -> None:
        """A step's committed tokens [rows, K+1], of which accepted [rows] + 1 are real, in the rows that decode
        (`decoding` [rows], bool)."""
        real = torch.arange(committed.shape[1], device=committed.device) <= accepted[:, None]
        self.observe_output(committed, real & decoding[:, None])

    def choose(self, logits: torch.Tensor, positions: torch.Tensor, path_tokens: torch.Tensor | None = None,
               on_path: torch.Tensor | None = None, position_index: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """The token each row chooses [rows, R] at R computed positions, from their logits [rows, R, V].

        positions [rows, P]: the sequence positions drawn at (a position's index in the sequence); the r-th
        computed position is positions[:, r], or positions[:, position_index[:, r]] when several computed
        positions share one (tree nodes of one depth). Where the output before a position also holds tokens not
        yet committed (a draft's path), path_tokens [rows, T] and on_path [rows, R, T] (bool) say which of the T
        drafted tokens precede each computed position. `noise`: `draw_noise(positions)`, where the caller has it.

        A sampled row draws argmax(scores / T + race noise), computed as argmax(scores + T * race noise): the same
        token, with the temperature applied to the noise of the P positions instead of to every computed row's
        scores (docs/algorithm.md, "Sampling as a seeded argmax")."""
        scores = logits
        if self._uses("penalties"):
            scores = self._penalised(scores.float(), path_tokens, on_path)
        greedy = scores.argmax(dim=-1)
        if not self._uses("sampling"):
            return greedy
        if self._uses("top_k_top_p") or self._uses("min_p"):  # they judge the tempered distribution
            warped = scores.float() / torch.where(self.temperature > 0, self.temperature, 1.0)[:, None, None]
            if self._uses("top_k_top_p"):
                warped = self._top_k_top_p(warped)
            if self._uses("min_p"):  # p >= min_p * max p; top-k and top-p keep the most likely token: order is moot
                floor = warped.amax(dim=-1, keepdim=True) + self.min_p.log()[:, None, None]
                warped = warped.masked_fill(warped < floor, -math.inf)
            scores = scores.float().masked_fill(warped == -math.inf, -math.inf)
        if noise is None:
            noise = self.draw_noise(positions)
        if position_index is not None:
            noise = noise.gather(1, position_index[:, :, None].expand(-1, -1, self.vocab))
        return torch.where(self.temperature[:, None] > 0, (scores + noise).argmax(dim=-1), greedy)

    def draw_noise(self, positions: torch.Tensor) -> torch.Tensor:
        """Each row's race noise times its temperature [rows, P, V] (float32; 0 for a greedy row) at the sequence
        positions `positions` [rows, P]: a sampled row's draw there is the argmax of its filtered scores plus
        this."""
        keys = stream_keys(self.seed_keys[:, None].expand_as(positions), positions)
        return race_noise(keys, self.token_keys) * self.temperature[:, None, None]

    def tree_noise(self, current: torch.Tensor, max_depth: int) -> torch.Tensor | None:
        """The draw noise [rows, max_depth + 1, V] (`draw_noise`) of the positions a tree step after the current
        tokens (at positions `current` [rows]) draws at, one per depth (`choose_in_tree`); None when no row
        samples. Computed before the forward, it lets the drafts follow the same draws
        (`device_drafts.DeviceDrafter.draft`)."""
        if not self._uses("sampling"):
            return None
        return self.draw_noise(tree_positions(current, max_depth))

    def choose_in_tree(self, logits: torch.Tensor, tree: TreeTensors, current: torch.Tensor, max_depth: int,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
        """The token each row chooses [rows, 1 + B] after its current token (at position `current` [rows]) and
        after each node of its token tree (batched, B nodes, at most `max_depth` deep): logits [rows, 1 + B, V] in
        that order. A node at depth d chooses the token at position current + 1 + d (one draw per depth), with its
        own path counted for the penalties. `noise`: `tree_noise(current, max_depth)`, where the caller has it."""
        rows, nodes = tree.tokens.shape
        depths = torch.cat([tree.depths.new_zeros(rows, 1), tree.depths], dim=1)
        on_path = torch.cat([tree.ancestors.new_zeros(rows, 1, nodes), tree.ancestors], dim=1)
        return self.choose(logits, tree_positions(current, max_depth), tree.tokens, on_path, depths, noise)

    def _penalised(self, scores, path_tokens, on_path) -> torch.Tensor:
        """The repetition penalty over prompt and output, then the presence and frequency penalties over the
        output (a draft's path included)."""
        counts = self.output_counts[:, None, :].expand_as(scores)
        if path_tokens is not None:
            index = path_tokens[:, None, :].expand(-1, scores.shape[1], -1)
            counts = counts.scatter_add(2, index, on_path.to(counts.dtype))
        seen = (counts > 0) | self.in_prompt[:, None, : self.vocab]
        penalty = self.repetition[:, None, None]
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        return scores - self.presence[:, None, None] * (counts > 0) - self.frequency[:, None, None] * counts

    def _top_k_top_p(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p (per row; off where disabled): the tokens they remove get -inf. Both keep only tokens
        among the most likely, so where the HEAD_TOKENS most likely are known to hold every kept token, only those
        are sorted."""
        filters = ((self.top_k > 0) | (self.top_p < 1))[:, None, None]
        # The shortcut syncs with the host, which neither a CUDA graph nor a compiled step may do (compiling split
        # the step there, and capturing it failed on the H100: `serve --compile` and top-p requests).
        fixed = torch.compiler.is_compiling() or (scores.is_cuda and torch.cuda.is_current_stream_capturing())
        if HEAD_TOKENS < scores.shape[-1] and not fixed:
            head, order = scores.topk(HEAD_TOKENS, dim=-1)
            keep, decided = self._kept(head, scores.logsumexp(dim=-1, keepdim=True))
            if bool((decided | ~filters[..., 0]).all()):
                filtered = torch.full_like(scores, -math.inf).scatter_(-1, order, head.masked_fill(~keep, -math.inf))
                return torch.where(filters, filtered, scores)
        ordered, order = scores.sort(dim=-1, descending=True)
        keep, _ = self._kept(ordered, None)
        return torch.full_like(scores, -math.inf).scatter_(-1, order, ordered.masked_fill(~keep, -math.inf))

    def _kept(self, ordered: torch.Tensor, vocab_total: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the scores `ordered` [rows, R, H] (the most likely, descending) top-k and then top-p keep; and
        whether every token they keep is among them. `vocab_total` [rows, R, 1] is the log-sum-exp over the whole
        vocabulary when `ordered` is only its head (None: `ordered` is the whole vocabulary, sorted)."""
        size = ordered.shape[-1]
        top_k_on, top_p_on = (self.top_k > 0)[:, None], (self.top_p < 1)[:, None]
        k = torch.where(self.top_k > 0, self.top_k, self.vocab)
        kth = ordered.gather(-1, (k.clamp(max=size) - 1)[:, None, None].expand(-1, ordered.shape[1], 1))
        keep = ordered >= kth  # ties with the k-th token are kept, as HF keeps them
        masked = ordered.masked_fill(~keep, -math.inf)
        if vocab_total is None:
            vocab_total = masked.logsumexp(dim=-1, keepdim=True)
        # Top-p renormalises over what top-k kept: all in `ordered` when its cut is (no tie runs past the end).
        cut_inside = (k <= size)[:, None] & (ordered[..., -1] < kth[..., 0])
        total = torch.where(top_k_on[..., None], masked.logsumexp(dim=-1, keepdim=True), vocab_total)
        probs = (masked - total).exp()
        running = cumulative_sum(probs) if torch.compiler.is_compiling() else probs.cumsum(dim=-1)
        before = running - probs  # the mass of the more likely tokens
        keep &= (before < self.top_p[:, None, None]) | ~top_p_on[..., None]
        reaches_top_p = before[..., -1] + probs[..., -1] >= self.top_p[:, None]
        decided = (~top_k_on | cut_inside) & (~top_p_on | reaches_top_p) & (top_k_on | top_p_on)
        return keep, decided
