"""Keeping exactly the committed tokens' KV after a fused step; the only module that touches caches' internals.

After a step the cache holds each sequence's prefix and all S step rows behind it. The committed tokens are the
current token (step row 0, already in place) and the accepted path's nodes; their KV moves right behind the
current token and everything after it is dropped.

* `commit_path_kv`: transformers' DynamicCache (one sequence), dropped through the cache's own `crop`;
* `RowCache`: a preallocated cache whose rows each hold one sequence of its own length (a batch with ragged
  acceptance), written at the slots the engine gives every forward; `move_kv` commits there.
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import StaticLayer


def commit_path_kv(cache: Cache, step_size: int, path_rows: torch.Tensor) -> None:
    """path_rows: [m] step rows of the accepted path's nodes, from depth 1 down."""
    accepted = path_rows.numel()
    if accepted > 0:
        for layer in cache.layers:
            step_start = layer.keys.shape[-2] - step_size
            src = path_rows + step_start
            dst = torch.arange(1, accepted + 1, device=src.device) + step_start
            layer.keys.index_copy_(-2, dst, layer.keys.index_select(-2, src))
            layer.values.index_copy_(-2, dst, layer.values.index_select(-2, src))
    cache.crop(-(step_size - 1 - accepted))


class RowLayer(StaticLayer):
    """A static layer that writes each batch row's new keys and values at that row's own slots."""

    slots: torch.Tensor  # [batch, new tokens]: where the next forward's tokens go, per row

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.slots[:, None, :, None]
        self.keys.scatter_(2, slots.expand_as(key_states), key_states)
        self.values.scatter_(2, slots.expand_as(value_states), value_states)
        return self.keys, self.values


class RowCache(Cache):
    """A preallocated KV cache of `max_cache_len` slots per batch row, every row at its own length.

    The lengths live with the engine; before each forward it says where every row's new tokens go (`write_at`),
    and the attention mask it builds says which slots each row sees. transformers' StaticCache keeps one length
    for the whole batch, so it cannot hold sequences that accept different numbers of tokens.
    """

    def __init__(self, config, max_cache_len: int) -> None:
        text_config = config.get_text_config(decoder=True)
        super().__init__(layers=[RowLayer(max_cache_len) for _ in range(text_config.num_hidden_layers)])

    def write_at(self, slots: torch.Tensor) -> None:
        """slots: [batch, tokens] cache slots of the next forward's tokens, per row (a device tensor)."""
        for layer in self.layers:
            layer.slots = slots

    def move_kv(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy each row's KV at slots `sources` [batch, n] to slots `targets` [batch, n]."""
        for layer in self.layers:
            for states in (layer.keys, layer.values):
                shape = (*states.shape[:2], sources.shape[1], states.shape[3])
                moved = states.gather(2, sources[:, None, :, None].expand(shape))
                states.scatter_(2, targets[:, None, :, None].expand(shape), moved)
