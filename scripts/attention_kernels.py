"""Attention kernels alone: µs per layer of one step's attention, the folded SDPA against the split-KV kernel.

Every layer's attention of one step (random K/V caches, one per layer, of `--slots` slots with the first 600 live
plus the step's own queries, the mask additive and folded once per forward as `model_adapter` does) is captured as
one CUDA graph per attention and replayed; the time per replay over the layers is the figure. The largest output
difference against the folded SDPA is printed beside it. Shapes are (query heads, KV heads, head dim, layers) of
SmolLM2-135M and Llama-3-8B; `--cases` lists batch x queries per row.

    python scripts/attention_kernels.py --shape llama-3-8b --slots 1152 --cases 1x1,1x4,1x16,8x1 --out k.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lookahead_decoding.attention import fold_mask, folded_gqa_attention
from lookahead_decoding.split_attention import split_kv_attention

SHAPES = {"smollm2-135m": (9, 3, 64, 30), "llama-3-8b": (32, 8, 128, 32)}
LIVE_SLOTS = 600


def replayed_us_per_layer(attend, layers: int, replays: int) -> float:
    """Time of one replay of a CUDA graph holding `attend(layer)` for every layer, per layer."""
    for _ in range(3):
        for layer in range(layers):
            attend(layer)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            attend(layer)
    graph.replay()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / replays / layers * 1e6


def case_costs(shape: str, batch: int, queries: int, slots: int, replays: int) -> dict:
    heads, kv_heads, dim, layers = SHAPES[shape]
    options = dict(device="cuda", dtype=torch.bfloat16)
    keys = [torch.randn(batch, kv_heads, slots, dim, **options) for _ in range(layers)]
    values = [torch.randn(batch, kv_heads, slots, dim, **options) for _ in range(layers)]
    query = torch.randn(batch, heads, queries, dim, **options)
    visible = LIVE_SLOTS + torch.arange(queries, device="cuda")[:, None]  # each query sees the cache and those before
    allowed = (torch.arange(slots, device="cuda") < visible).expand(batch, 1, queries, slots)
    mask = torch.zeros(allowed.shape, **options).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    mask = fold_mask(mask, heads // kv_heads) if queries > 1 else mask  # as model_adapter hands it over
    scale = 1 / math.sqrt(dim)
    attentions = {"folded_sdpa": folded_gqa_attention, "split_kv": split_kv_attention}
    reference = folded_gqa_attention(query, keys[0], values[0], mask, scale).float()
    costs = {}
    for name, attention in attentions.items():
        difference = (attention(query, keys[0], values[0], mask, scale).float() - reference).abs().max().item()
        us = replayed_us_per_layer(lambda layer: attention(query, keys[layer], values[layer], mask, scale), layers,
                                   replays)
        costs[name] = {"us_per_layer": round(us, 2), "max_difference": difference}
    return {"shape": shape, "batch": batch, "queries": queries, "folded_rows": queries * heads // kv_heads,
            "slots": slots, **costs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--slots", type=int, default=1024, help=f"cache slots read (at least {LIVE_SLOTS + 64})")
    parser.add_argument("--cases", default="1x1,1x4,1x16,8x1,8x16,64x1", metavar="BxQ[,BxQ...]",
                        help="batch x queries per row")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the kernels are timed as captured CUDA graphs)")
    if args.slots < LIVE_SLOTS + 64:
        parser.error(f"--slots must be at least {LIVE_SLOTS + 64}, got {args.slots}")
    try:
        cases = [tuple(int(part) for part in case.split("x")) for case in args.cases.split(",")]
    except ValueError:
        parser.error(f"--cases takes BxQ pairs such as 1x1,8x16, got {args.cases!r}")
    rows = []
    for batch, queries in cases:
        rows.append(case_costs(args.shape, batch, queries, args.slots, args.replays))
        print(json.dumps(rows[-1]), flush=True)
    record = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}
    with open(args.out, "w") as file:
        json.dump(record, file, indent=1)


if __name__ == "__main__":
    main()
