"""Verification: which candidate tokens the model itself would have produced.

A verifier gets the logits of the current token and of every candidate token and returns one packed int64
tensor (accepted draft tokens m, winning candidate, committed tokens padded to K+1), so the loop fetches the
outcome with a single host sync. Greedy verification lives here; sampling verification in `sampling.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Verifier(Protocol):
    def __call__(
        self,
        next_logits: torch.Tensor,  # [V] logits after the current token
        candidates: torch.Tensor,  # [G, K] candidate tokens for positions t+1..t+K
        candidate_logits: torch.Tensor,  # [G, K, V] logits after each candidate token
        valid: torch.Tensor,  # [G] False for padding rows
        history: Sequence[int],  # committed tokens, the current token last
    ) -> torch.Tensor: ...


class GreedyVerifier:
    """Exact greedy verification: argmax everywhere, longest matching prefix wins."""

    def __call__(self, next_logits, candidates, candidate_logits, valid, history) -> torch.Tensor:
        return verify_greedy(next_logits.argmax(-1), candidates, candidate_logits.argmax(-1), valid)


def verify_greedy(
    next_token: torch.Tensor, candidates: torch.Tensor, candidate_preds: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Pick the candidate whose longest prefix the model itself would have produced.

    next_token: [] the model's argmax after the current token (always committed).
    candidates: [G, K] candidate tokens for positions t+1..t+K.
    candidate_preds: [G, K] the model's argmax after each candidate token.
    valid: [G] False for padding rows.

    Returns one int64 tensor [2 + K + 1]: (accepted draft tokens m, winning candidate, committed tokens
    padded to K+1). The committed tokens are next_token followed by the model's predictions along the
    winner: m+1 tokens, so K+1 (= N) when a candidate matches fully. Packing them lets the caller fetch
    everything with one host sync.
    """
    guesses, length = candidates.shape
    if guesses == 0:
        committed = torch.cat([next_token.view(1), next_token.new_zeros(length)])
        return torch.cat([next_token.new_zeros(2), committed])
    expected = torch.cat([next_token.view(1, 1).expand(guesses, 1), candidate_preds[:, :-1]], dim=1)
    matches = (candidates == expected) & valid[:, None]
    accepted = matches.long().cumprod(dim=1).sum(dim=1)
    best = torch.argmax(accepted).view(1)  # first maximum: the best-ranked candidate wins ties
    # index_select, not [best]: indexing by a device scalar would sync with the host (and break graph capture).
    committed = torch.cat([next_token.view(1), candidate_preds.index_select(0, best)[0]])
    return torch.cat([accepted.index_select(0, best), best, committed])
