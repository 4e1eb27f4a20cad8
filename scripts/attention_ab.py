"""Step cost of the static engine under transformers' SDPA attention and under ours (attention.py), side by side.

`--attention` names what to compare: `sdpa` (transformers' own), `folded` (ours, every step on SDPA with the query
heads folded) and `ours` (ours as the engine runs it: steps of few rows on the split-KV kernel, split_attention.py).

For each batch size, one engine per attention is built over the same model, every row is prefilled with a prompt
of --prompt-tokens tokens, and each step shape is replayed back to back (device time; a CUDA graph on CUDA) and
then run as decoding runs it, one host sync per step. Rows ride along idle during the timed replays, so the cache
lengths stay put and every replay does the same work. With --kernels K, the K kernels that take the most device
time in an uncaptured step of each shape are listed too (torch.profiler).

    python scripts/attention_ab.py --model SmolLM2-135M-Instruct.Q4_1.gguf --batch-size 1,8,64 --out ab.json
    python scripts/attention_ab.py --random-shape llama-3-8b --batch-size 1,8 --out ab8b.json
    python scripts/attention_ab.py --random-shape llama-3-8b --batch-size 1 --attention folded,ours --kernels 12 \
        --out k.json
    python scripts/attention_ab.py --random-shape llama-3-8b --batch-size 1 --attention ours --shapes plain,device \
        --compile --out c.json
"""

from __future__ import annotations

import argparse
import json
import time

import contextlib

import torch
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from lookahead_decoding import LookaheadConfig, load_model, split_attention
from lookahead_decoding.attention import NAME
from lookahead_decoding.cli.tune import RANDOM_SHAPES, random_model
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.sampling_params import SamplingParams

ATTENTIONS = ("sdpa", "folded", "ours")
SHAPES = {"plain": AUTOREGRESSIVE,
          "W5 N4 G5 B15 K12": LookaheadConfig(5, 4, 5, candidate_length=12, tree_nodes=15),
          "W20 N7 G20 B120 K12": LookaheadConfig(20, 7, 20, candidate_length=12, tree_nodes=120),
          "device": LookaheadConfig(device_drafts=True),  # auto's drafting step on CUDA at batch 1
          "device B31": LookaheadConfig(device_drafts=True, tree_nodes=31),
          "device B15": LookaheadConfig(device_drafts=True, tree_nodes=15)}  # auto's at 32 rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def top_kernels(step, device: torch.device, steps: int, count: int) -> dict[str, float]:
    """Device microseconds per step of the `count` costliest kernels of `step` (an uncaptured step function)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    per_kernel: dict[str, float] = {}
    for event in profiler.events():
        if event.device_type == DeviceType.CUDA:
            per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.time_range.elapsed_us() / steps
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:count]
    return {"kernel_us_per_step": round(sum(per_kernel.values()), 1),
            "top_kernels_us": {name[:120]: round(us, 1) for name, us in top}}


def step_costs(model, attention: str, batch_size: int, prompt_tokens: int, replays: int, kernels: int,
               shapes: dict[str, LookaheadConfig], compile: bool, temperature: float = 0.0) -> dict:
    engine = StaticStep(model, list(shapes.values()), max_length=prompt_tokens + 64, batch_size=batch_size,
                        compile=compile, sampling=temperature > 0)
    model.set_attn_implementation("sdpa" if attention == "sdpa" else NAME)  # after the engine chose ours: the A/B
    kernel_devices = split_attention.DEVICES
    if attention == "folded":  # ours with the split-KV kernel off
        split_attention.DEVICES = ()
    prompt = [(7 * i) % 1000 + 10 for i in range(prompt_tokens)]
    sampling = {row: SamplingParams(temperature=temperature, seed=row) for row in range(batch_size)}
    with torch.inference_mode():
        engine.prefill_rows({row: prompt for row in range(batch_size)}, sampling if temperature > 0 else None)
        result = {}
        for index, name in enumerate(shapes):
            engine.inputs[index].zero_()  # idle rows: the same work, lengths unchanged
            step = engine.replayable(index)
            for _ in range(3):
                step()
            synchronize(engine.adapter.device)
            began = time.perf_counter()
            for _ in range(replays):
                step()
            synchronize(engine.adapter.device)
            replayed = (time.perf_counter() - began) / replays * 1e3
            began = time.perf_counter()
            for _ in range(replays):
                step()[0].tolist()
            with_sync = (time.perf_counter() - began) / replays * 1e3
            result[name] = {"replayed_ms": round(replayed, 4), "with_host_sync_ms": round(with_sync, 4)}
            if kernels and engine.adapter.device.type == "cuda":
                result[name].update(top_kernels(step.fn, engine.adapter.device, 5, kernels))
    model.set_attn_implementation(NAME)
    split_attention.DEVICES = kernel_devices
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder, .gguf file or Hub name")
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", default="1,8,64")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--attention", default="sdpa,ours", metavar="NAME[,NAME...]",
                        help=f"attentions to time side by side, of: {', '.join(ATTENTIONS)} (default: sdpa,ours)")
    parser.add_argument("--sdpa-backends", default="default", metavar="NAME[,NAME...]",
                        help="time each step under each of these SDPA backends (default: PyTorch's choice; others: "
                        "cudnn_attention, efficient_attention, math)")
    parser.add_argument("--kernels", type=int, default=0, metavar="K",
                        help="also list the K costliest kernels of each uncaptured step (CUDA)")
    parser.add_argument("--shapes", default="plain,W5 N4 G5 B15 K12,W20 N7 G20 B120 K12", metavar="NAME[,NAME...]",
                        help=f"step shapes to time, of: {', '.join(SHAPES)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile each step before capturing it")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="every row samples at this temperature (default: 0, greedy)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    names = args.shapes.split(",")
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    shapes = {name: SHAPES[name] for name in names}
    attentions = args.attention.split(",")
    if not set(attentions) <= set(ATTENTIONS):
        parser.error(f"unknown attentions {sorted(set(attentions) - set(ATTENTIONS))}; choose from {ATTENTIONS}")
    if args.random_shape:
        model = random_model(args.random_shape, args.device, args.dtype)
    else:
        model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = []
    for batch_size in (int(b) for b in args.batch_size.split(",")):
        for attention in attentions:
            for backend in args.sdpa_backends.split(","):
                with contextlib.nullcontext() if backend == "default" else sdpa_kernel(getattr(SDPBackend, backend.upper())):
                    costs = step_costs(model, attention, batch_size, args.prompt_tokens, args.replays, args.kernels,
                                       shapes, args.compile, args.temperature)
                rows.append({"batch_size": batch_size, "attention": attention, "sdpa_backend": backend, **costs})
            print(json.dumps(rows[-1]), flush=True)
    record = {"model": args.random_shape or args.model, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
              "compiled": args.compile, "temperature": args.temperature,
              "torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "rows": rows}
    with open(args.out, "w") as file:
        json.dump(record, file, indent=1)


if __name__ == "__main__":
    main()
