"""Keeping exactly the committed tokens' KV after a fused step.

After the step the cache holds prefix + all S step rows. The committed tokens are the current token (step row
0, already in place) and the first m tokens of the winning candidate; their KV moves right behind the current
token and everything after it is cropped through the cache's own `crop`.
"""

from __future__ import annotations

import torch
from transformers import Cache


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
