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

import math

import torch

from .draws import race_noise, stream_keys, token_keys
from .layout import TreeTensors
from .sampling_params import SamplingParams

_GREEDY = SamplingParams()


class RowSampler:
    """The sampling parameters of `rows` rows as device tensors, and the token counts the penalties read: how often
    each token occurs in a row's output so far, and whether it occurs in its prompt."""

    def __init__(self, rows: int, vocab: int, device) -> None:
        self.rows, self.vocab = rows, vocab
        zeros = lambda dtype=torch.float32: torch.zeros(rows, dtype=dtype, device=device)  # noqa: E731
        self.temperature, self.top_p, self.min_p = zeros(), zeros() + 1, zeros()
        self.repetition, self.presence, self.frequency = zeros() + 1, zeros(), zeros()
        self.top_k, self.seeds = zeros(torch.long), zeros(torch.long)
        self.output_counts = torch.zeros(rows, vocab, device=device)
        self.in_prompt = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)  # + a spare column
        self.token_keys = token_keys(vocab, device)

    def start_rows(self, params: dict[int, SamplingParams | None]) -> None:
        """Rows that begin a new sequence (between steps, outside any graph): their parameters (None: greedy)
        and empty counts."""
        if not params:
            return
        rows = torch.tensor(list(params), device=self.seeds.device)
        given = [_GREEDY if p is None else p for p in params.values()]
        for tensor, values in (
            (self.temperature, [p.temperature for p in given]), (self.top_p, [p.top_p for p in given]),
            (self.min_p, [p.min_p for p in given]), (self.repetition, [p.repetition_penalty for p in given]),
            (self.presence, [p.presence_penalty for p in given]),
            (self.frequency, [p.frequency_penalty for p in given]),
            (self.top_k, [p.top_k for p in given]), (self.seeds, [p.seed for p in given]),
        ):
            tensor.index_copy_(0, rows, torch.tensor(values, dtype=tensor.dtype).to(tensor.device))
        self.output_counts.index_fill_(0, rows, 0)
        self.in_prompt.index_fill_(0, rows, False)

    def observe_prompt(self, ids: torch.Tensor, real: torch.Tensor) -> None:
        """Prompt tokens ids [rows, C] where `real` [rows, C] (bool) is set: the repetition penalty covers them."""
        # Ids that are not real go to a spare last column, so no write of False can race a write of True.
        self.in_prompt.scatter_(1, torch.where(real, ids, self.vocab), True)

    def observe_output(self, tokens: torch.Tensor, real: torch.Tensor) -> None:
        """Committed output tokens [rows, T] where `real` [rows, T] (bool) is set."""
        self.output_counts.scatter_add_(1, tokens, real.to(self.output_counts.dtype))

    def choose(self, logits: torch.Tensor, positions: torch.Tensor, path_tokens: torch.Tensor | None = None,
               on_path: torch.Tensor | None = None) -> torch.Tensor:
        """The token each row chooses [rows, R] at R computed positions: logits [rows, R, V] of the position
        `positions` [rows, R] (its index in the sequence). Where the output before a position also holds tokens
        not yet committed (a draft's path), path_tokens [rows, P] and on_path [rows, R, P] (bool) say which of the
        P drafted tokens precede each position."""
        scores = logits.float()
        counts = self.output_counts[:, None, :].expand_as(scores)
        if path_tokens is not None:
            index = path_tokens[:, None, :].expand(-1, scores.shape[1], -1)
            counts = counts.scatter_add(2, index, on_path.to(counts.dtype))
        seen = (counts > 0) | self.in_prompt[:, None, : self.vocab]
        penalty = self.repetition[:, None, None]
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        scores = scores - self.presence[:, None, None] * (counts > 0) - self.frequency[:, None, None] * counts
        greedy = scores.argmax(dim=-1)
        temperature = torch.where(self.temperature > 0, self.temperature, 1.0)
        drawn = (self._warped(scores / temperature[:, None, None])
                 + race_noise(stream_keys(self.seeds[:, None].expand_as(positions), positions), self.token_keys))
        return torch.where(self.temperature[:, None] > 0, drawn.argmax(dim=-1), greedy)

    def choose_in_tree(self, logits: torch.Tensor, tree: TreeTensors, current: torch.Tensor) -> torch.Tensor:
        """The token each row chooses [rows, 1 + B] after its current token (at position `current` [rows]) and
        after each node of its token tree (batched, B nodes): logits [rows, 1 + B, V] in that order. A node at
        depth d chooses the token at position current + 1 + d, with its own path counted for the penalties."""
        rows = tree.tokens.shape[0]
        depths = torch.cat([tree.depths.new_zeros(rows, 1), tree.depths], dim=1)
        on_path = torch.cat([tree.ancestors.new_zeros(rows, 1, tree.ancestors.shape[2]), tree.ancestors], dim=1)
        return self.choose(logits, current[:, None] + 1 + depths, tree.tokens, on_path)

    def _warped(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p, then min-p (per row; off where disabled): the tokens they remove get -inf."""
        ordered, order = scores.sort(dim=-1, descending=True)
        vocab = scores.shape[-1]
        kth = torch.where(self.top_k > 0, self.top_k.clamp(max=vocab), vocab) - 1
        keep = ordered >= ordered.gather(-1, kth[:, None, None].expand(-1, ordered.shape[1], 1))  # ties kept
        probs = torch.softmax(ordered.masked_fill(~keep, -math.inf), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
        keep &= (before < self.top_p[:, None, None]) | (self.top_p >= 1)[:, None, None]
        keep &= ordered >= ordered[..., :1] + self.min_p.log()[:, None, None]  # p >= min_p * max p
        return torch.full_like(scores, -math.inf).scatter_(-1, order, ordered.masked_fill(~keep, -math.inf))
