"""Input layout and attention mask of the fused lookahead + verification step.

One decode step feeds the model, in this order (W = window, N = ngram, B = tree nodes):

* row 0: the current token (last committed token, position t);
* level 0, columns 1..W-1 (positions t+1..t+W-1); the current token is level 0, column 0;
* levels 1..N-2, columns 0..W-1 (level l, column c sits at position t+l+c);
* the B nodes of the token tree, best first (a node at depth d sits at position t+d).

Mask rules (docs/algorithm.md, "The step's input layout and attention mask"): level 0 is an ordinary causal row;
a token at level l >= 1, column c sees level 0 up to column c and column c of levels 1..l; a tree node sees the
current token, its ancestors and itself. Every row also sees the whole KV cache. Both branches share one forward
pass but cannot see each other.

The lookahead rows are the same every step and built once, on the device; the tree rows change with the tree and
are filled in from its ancestor matrix (`tree_tensors`) on the device, so every step of a shape has one shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import LookaheadConfig


class TreeTensors(NamedTuple):
    """One step's token tree on the device, padded to the shape's node budget B."""

    tokens: torch.Tensor  # [B]
    parents: torch.Tensor  # [B] parent node, or B for the children of the current token (and padding)
    ancestors: torch.Tensor  # [B, B] bool: ancestors[i, j] when node j is node i or one of its ancestors
    depths: torch.Tensor  # [B] 1 for the current token's children
    valid: torch.Tensor  # [B] False for padding


def tree_tensors(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor, max_depth: int) -> TreeTensors:
    """The tree's ancestor matrix and depths, by `max_depth` rounds of "my ancestors are my parent's, and me"
    (fixed shapes, device ops only). parents: [B] with the root as B; nodes past `num_nodes` are padding."""
    size = tokens.numel()
    itself = torch.eye(size, dtype=torch.bool, device=tokens.device)
    ancestors = itself
    for _ in range(max_depth - 1):
        with_root = torch.cat([ancestors, ancestors.new_zeros(1, size)])  # the root row: no ancestors
        ancestors = itself | with_root[parents]
    valid = torch.arange(size, device=tokens.device) < num_nodes
    return TreeTensors(tokens, parents, ancestors, ancestors.sum(dim=1), valid)


@dataclass(frozen=True)
class StepLayout:
    """Index bookkeeping for one fused step; all tensors live on `device`."""

    config: LookaheadConfig
    lookahead_offsets: torch.Tensor  # [(N-1)·W] position of each lookahead row relative to the current token
    lookahead_allowed: torch.Tensor  # [(N-1)·W, S] bool: which step rows each lookahead row may attend to
    tree_sees_lookahead: torch.Tensor  # [B, (N-1)·W] bool: tree nodes see the current token only
    # rows whose logits are used: current token, last level, tree nodes (every row, where the device drafts: its
    # tables learn from the whole window)
    logit_rows: torch.Tensor

    @property
    def size(self) -> int:
        return self.lookahead_size + self.config.tree_nodes

    @property
    def lookahead_size(self) -> int:
        """Rows of the lookahead branch, the current token included: (N-1)·W."""
        return self.config.levels * self.config.window

    @property
    def carries_prompts(self) -> bool:
        """Whether a row of this shape's step can carry a new sequence's prompt ids in place of its own step: the
        shape drafts on the device and has no window, so every row's logits are computed, in order."""
        return self.config.device_drafts and not self.config.has_window

    @property
    def tree_rows(self) -> slice:
        return slice(self.lookahead_size, self.size)

    # Rows of the step's logits (see `logit_rows`): the current token's, then the last level's, then the tree's.
    # With one level (N=2) the last level is level 0, whose first row is the current token's: it is kept once.
    # Where the device drafts: every window row, the current token's first and the last level's last.
    @property
    def new_level_logits(self) -> slice:
        if self.config.device_drafts:
            return slice(self.lookahead_size - self.config.window, self.lookahead_size)
        first = 0 if self.config.levels == 1 else 1
        return slice(first, first + self.config.window)

    @property
    def tree_logits(self) -> slice:
        return slice(self.new_level_logits.stop, None)

    def current_and_tree(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows [..., 1 + B, V] of a step's logits [..., logit rows, V] after the current token and after each
        tree node: a view where the tree's rows follow the current token's (no window; a batch's logits are
        large), else a copy."""
        if self.tree_logits.start == 1:
            return logits[..., : 1 + self.config.tree_nodes, :]
        return torch.cat([logits[..., :1, :], logits[..., self.tree_logits, :]], dim=-2)

    def positions(self, tree: TreeTensors) -> torch.Tensor:
        """[S] position of every row relative to the current token."""
        return torch.cat([self.lookahead_offsets, tree.depths])

    def allowed(self, tree: TreeTensors) -> torch.Tensor:
        """[S, S] bool: which step rows each row may attend to (only the tree's block changes from step to step)."""
        return torch.cat([self.lookahead_allowed, torch.cat([self.tree_sees_lookahead, tree.ancestors], dim=1)])

    @classmethod
    def build(cls, config: LookaheadConfig, device: torch.device | str = "cpu") -> "StepLayout":
        window, levels = config.window, config.levels
        lookahead = levels * window
        row = torch.arange(lookahead)
        level, column = row // window, row % window
        q_level, k_level = level[:, None], level[None, :]
        q_col, k_col = column[:, None], column[None, :]
        sees_row0 = (k_level == 0) & (k_col <= q_col)
        sees_own_column = (k_level >= 1) & (k_level <= q_level) & (k_col == q_col)

        nodes = config.tree_nodes
        lookahead_allowed = torch.cat([sees_row0 | sees_own_column, torch.zeros(lookahead, nodes, dtype=torch.bool)], 1)
        tree_sees_lookahead = torch.zeros(nodes, lookahead, dtype=torch.bool)
        tree_sees_lookahead[:, 0] = True  # tree nodes continue the current token

        last_level = torch.arange((levels - 1) * window, lookahead)
        current = torch.zeros(0 if levels == 1 else 1, dtype=torch.long)  # level 0 already starts with it
        logit_rows = torch.arange(lookahead + nodes) if config.device_drafts else \
            torch.cat([current, last_level, torch.arange(lookahead, lookahead + nodes)])
        return cls(config, (level + column).to(device), lookahead_allowed.to(device), tree_sees_lookahead.to(device),
                   logit_rows.to(device))

    def input_ids(self, current: int, window_tokens: list[int], tree_tokens: list[int]) -> list[int]:
        """One step's tokens in layout order; `tree_tokens` padded to the node budget."""
        ids = [current, *window_tokens, *tree_tokens]
        if len(ids) != self.size:
            raise AssertionError(f"step input has {len(ids)} tokens, layout expects {self.size}")
        return ids
