"""Keeping exactly the committed tokens' KV after a fused step on a dynamic cache.

After the step the cache holds prefix + all S step rows. The committed tokens are the current token (step row
0, already in place) and the accepted path's nodes; their KV moves right behind the current token and everything
after it is cropped through the cache's own `crop`.
"""

from __future__ import annotations

import torch
from transformers import Cache


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
