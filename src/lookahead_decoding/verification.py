"""Verification: which draft tokens of the tree the model itself would have produced.

A verifier gets the logits after the current token and after every tree node, and returns one packed int64
tensor (`pack`: accepted draft tokens m, the committed tokens padded to K+1, the accepted path's nodes padded to
K), so the loop fetches the outcome with a single host sync. `verify_greedy` lives here: it verifies drafts against
the token each position chooses (the argmax, or a row's seeded draw, `row_sampler.py`). The host verifiers for
logits processors are in `sampling.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .layout import TreeTensors


class Verifier(Protocol):
    def __call__(
        self,
        next_logits: torch.Tensor,  # [V] logits after the current token
        tree: TreeTensors,  # the step's token tree (B nodes)
        tree_logits: torch.Tensor,  # [B, V] logits after each tree node
        max_depth: int,  # K: the tree's depth limit
        history: Sequence[int],  # committed tokens, the current token last
    ) -> torch.Tensor: ...


def verified_first_token(verifier: Verifier, logits: torch.Tensor, history: Sequence[int]) -> int:
    """The token a prefill commits under `verifier`: its choice from the logits [V] after the prompt (`history`),
    with an empty tree (a verifier that samples draws it, as the steps after do)."""
    none = torch.empty(0, dtype=torch.long, device=logits.device)
    empty = TreeTensors(none, none, none.view(0, 0).bool(), none, none.bool())
    return int(verifier(logits, empty, logits.new_empty(0, logits.shape[-1]), 1, history)[1])


def pack(accepted: torch.Tensor, committed: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """[1 + (K+1) + K]: accepted m, committed tokens (m+1 real), the accepted path's nodes (m real)."""
    return torch.cat([accepted.view(1), committed, path])


def verify_greedy(next_token: torch.Tensor, node_preds: torch.Tensor, tree: TreeTensors, max_depth: int) -> torch.Tensor:
    """next_token: [] the model's argmax after the current token (always committed); node_preds: [B] its argmax
    after each node. A node matches when its token is what the model predicts after its parent; it is accepted
    when it and all its ancestors match. The deepest accepted node wins (the best-ranked, i.e. first, on ties);
    the committed tokens are next_token followed by the model's predictions along its path: m+1 tokens, so K+1
    when a path of depth K is accepted. Fixed shapes and no host sync, so it can be captured in a CUDA graph."""
    size = node_preds.numel()
    if size == 0:
        zeros = next_token.new_zeros(max_depth)
        return pack(next_token.new_zeros(()), torch.cat([next_token.view(1), zeros]), zeros)
    expected = torch.cat([node_preds, next_token.view(1)])[tree.parents]  # the prediction after each parent
    matches = (tree.tokens == expected) & tree.valid
    accepted_nodes = ~(tree.ancestors & ~matches[None, :]).any(dim=1)
    reach = torch.where(accepted_nodes, tree.depths, 0)
    best = reach.argmax().view(1)  # first maximum: the best-ranked node wins ties
    # index_select, not [best]: indexing by a device scalar would sync with the host (and break graph capture).
    on_path = tree.ancestors.index_select(0, best)[0]
    levels = torch.arange(1, max_depth + 1, device=node_preds.device)
    path = (on_path[None, :] & (tree.depths[None, :] == levels[:, None])).int().argmax(dim=1)  # [K] node per depth
    committed = torch.cat([next_token.view(1), node_preds[path]])
    return pack(reach.index_select(0, best)[0], committed, path)
