"""The attention our steps run: SDPA under the step's 4D mask, grouped-query attention without copying the cache.

transformers' SDPA path uses SDPA's own grouped-query attention only when no mask is passed; under a mask it
expands K and V to every query head (`repeat_kv`), which for a static cache copies the whole cache in every layer
on every step. A batched step spent most of its device time in that copy (docs/benchmarks.md, "Engine").

Here the query heads that share a KV head are folded into the query length instead: queries
[batch, H_kv · groups, Q, D] become [batch, H_kv, groups · Q, D], attending to the cache's own [batch, H_kv, L, D],
and the mask [batch, 1, Q, L] is repeated per group (Q rows, not L · D values, are copied). The arithmetic is the
same attention. A mask narrower than the cache reads only the cache's first slots, as many as the mask has columns:
the engine's steps attend to what their rows hold, not to every slot (`engine.attention_widths`).
Steps of few query rows on CUDA go to a split-KV kernel instead (`split_attention.py`), which spreads
the cache's read over the device rather than one tile per KV head.
It is registered in transformers' `AttentionInterface` as `lookahead_sdpa`, and `model_adapter`
selects it (`set_attn_implementation`) for a model loaded with `sdpa`. Whatever it does not cover (no mask,
per-head masks, soft-capping, attention sinks, dropout) goes to transformers' own SDPA function unchanged, so the
model computes what it computed before, in every forward, ours or not.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import split_attention

NAME = "lookahead_sdpa"


def fold_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """A mask [B or 1, 1, Q, L] for the folded queries: [B or 1, 1, groups · Q, L], the Q rows once per group.
    `model_adapter` folds the masks it builds once per forward, so that the layers need not copy them each."""
    return mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * mask.shape[2], -1)


def folded_gqa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         scaling: float | None) -> torch.Tensor:
    """SDPA of query [B, H, Q, D] over key/value [B, H_kv, L, D] under an additive or boolean mask
    [B or 1, 1, Q, L], or one already folded for these heads (`fold_mask`); returns [B, Q, H, D] (the layout
    attention functions hand back)."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    mask = split_attention.mask_for_heads(mask, length, groups)
    folded = length > 1 and mask.shape[2] == groups * length
    if groups > 1:
        query = query.reshape(batch, key.shape[1], groups * length, dim)
        if length > 1 and not folded:  # (one query row's mask broadcasts over its group as it is)
            mask = fold_mask(mask, groups)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous()


def lookahead_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: the folded attention where it applies, transformers' SDPA elsewhere."""
    special = any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux", "sinks"))
    plain_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[2]:  # the cache's first slots only
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    if special or dropout != 0.0 or not plain_mask or query.shape[1] % key.shape[1]:
        if plain_mask:  # a folded mask's first Q rows are the mask
            attention_mask = attention_mask[:, :, : query.shape[2]]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if split_attention.applies(query, key, attention_mask):
        return split_attention.split_kv_attention(query, key, value, attention_mask, scaling), None
    return folded_gqa_attention(query, key, value, attention_mask, scaling), None


AttentionInterface.register(NAME, lookahead_sdpa_forward)
# The model's own forwards (e.g. model.generate after ours) build the masks SDPA takes.
AttentionMaskInterface.register(NAME, sdpa_mask)
