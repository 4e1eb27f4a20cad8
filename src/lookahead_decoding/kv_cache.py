"""Keeping exactly the committed tokens' KV after a fused step, and the static engine's cache.

After the step the cache holds prefix + all S step rows. The committed tokens are the current token (step row
0, already in place) and the first m tokens of the winning candidate; their KV moves right behind the current
token and everything after it is cropped through the cache's own `crop` (dynamic cache), or the length is set
to what was committed (`SlabCache`, the static engine's).
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import StaticLayer

from .model_adapter import UnsupportedModelError


def commit_candidate_kv(cache: Cache, step_size: int, source_rows: torch.Tensor, accepted: int) -> None:
    """source_rows: [K] step rows of the winning candidate's tokens; the first `accepted` are kept."""
    if accepted > 0:
        for layer in cache.layers:
            step_start = layer.keys.shape[-2] - step_size
            src = source_rows[:accepted] + step_start
            dst = torch.arange(1, accepted + 1, device=src.device) + step_start
            layer.keys.index_copy_(-2, dst, layer.keys.index_select(-2, src))
            layer.values.index_copy_(-2, dst, layer.values.index_select(-2, src))
    cache.crop(-(step_size - 1 - accepted))


class SlabLayer(StaticLayer):
    """One layer of a `SlabCache`: its keys and values are views into the slab, written at the shared length."""

    def __init__(self, slab_cache: "SlabCache", index: int) -> None:
        super().__init__(max_cache_len=slab_cache.max_cache_len)
        self.slab_cache, self.index = slab_cache, index
        self.cumulative_length = slab_cache.length  # the same tensor in every layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slab = self.slab_cache.allocate(key_states)
        if key_states.shape != value_states.shape or key_states.shape[:2] != slab.shape[2:4] or (
            key_states.shape[-1] != slab.shape[-1]
        ):
            raise UnsupportedModelError(
                "the static engine needs the same key/value shape in every layer; "
                f"layer {self.index} has keys {tuple(key_states.shape)} and values {tuple(value_states.shape)}"
            )
        self.keys, self.values = slab[0, self.index], slab[1, self.index]
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # Unlike StaticLayer, the length is not advanced here: the engine sets it once per step, for all layers.
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.keys.index_copy_(2, positions, key_states)
        self.values.index_copy_(2, positions, value_states)
        return self.keys, self.values


class SlabCache(Cache):
    """A static KV cache whose layers share one buffer, [2 (keys, values), layers, batch, heads, slots, head_dim],
    and one length tensor. Moving the winner's KV into place is then one gather and one scatter for the whole model
    instead of four per layer, and setting the length is one write: the fused step launches fewer kernels."""

    def __init__(self, config, max_cache_len: int, device: torch.device | str = "cpu") -> None:
        self.max_cache_len = max_cache_len
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.slab: torch.Tensor | None = None
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[SlabLayer(self, index) for index in range(num_layers)])

    def allocate(self, key_states: torch.Tensor) -> torch.Tensor:
        """The slab, allocated on the first layer's first write with that layer's dtype, device and head shape."""
        if self.slab is None:
            batch, heads, _, head_dim = key_states.shape
            self.slab = key_states.new_zeros((2, len(self.layers), batch, heads, self.max_cache_len, head_dim))
            # Fixed addresses, so that torch.compile and CUDA graphs may keep pointing at them.
            torch._dynamo.mark_static_address(self.slab)
            torch._dynamo.mark_static_address(self.length)
        return self.slab

    def reset(self) -> None:
        # Slots past the length are never attended (the step's mask), so stale KV may stay.
        self.length.zero_()

    def set_length(self, length) -> None:
        self.length.copy_(length)

    def move(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy the KV of slots `source` to slots `target` in every layer (the gather copies first: overlap is safe)."""
        self.slab.index_copy_(4, target, self.slab.index_select(4, source))
