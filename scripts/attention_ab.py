"""Step cost of the static engine under transformers' SDPA attention and under ours (attention.py), side by side.

For each batch size, one engine per attention is built over the same model, every row is prefilled with a prompt
of --prompt-tokens tokens, and each step shape is replayed back to back (device time; a CUDA graph on CUDA) and
then run as decoding runs it, one host sync per step. Rows ride along idle during the timed replays, so the cache
lengths stay put and every replay does the same work.

    python scripts/attention_ab.py --model SmolLM2-135M-Instruct.Q4_1.gguf --batch-size 1,8,64 --out ab.json
    python scripts/attention_ab.py --random-shape llama-3-8b --batch-size 1,8 --out ab8b.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lookahead_decoding import LookaheadConfig, load_model
from lookahead_decoding.attention import NAME
from lookahead_decoding.cli.tune import RANDOM_SHAPES, random_model
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.engine import StaticStep

SHAPES = {"plain": AUTOREGRESSIVE,
          "W5 N4 G5 B15 K12": LookaheadConfig(5, 4, 5, candidate_length=12, tree_nodes=15),
          "W20 N7 G20 B120 K12": LookaheadConfig(20, 7, 20, candidate_length=12, tree_nodes=120)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_costs(model, attention: str, batch_size: int, prompt_tokens: int, replays: int) -> dict:
    engine = StaticStep(model, list(SHAPES.values()), max_length=prompt_tokens + 64, batch_size=batch_size)
    model.set_attn_implementation(attention)  # after the engine chose ours: the A/B switch
    prompt = [(7 * i) % 1000 + 10 for i in range(prompt_tokens)]
    with torch.inference_mode():
        engine.prefill_rows({row: prompt for row in range(batch_size)})
        result = {}
        for index, name in enumerate(SHAPES):
            engine.inputs[index].zero_()  # idle rows: the same work, lengths unchanged
            for _ in range(3):
                engine.run_step[index]()
            synchronize(engine.adapter.device)
            began = time.perf_counter()
            for _ in range(replays):
                engine.run_step[index]()
            synchronize(engine.adapter.device)
            replayed = (time.perf_counter() - began) / replays * 1e3
            began = time.perf_counter()
            for _ in range(replays):
                engine.run_step[index]()[0].tolist()
            with_sync = (time.perf_counter() - began) / replays * 1e3
            result[name] = {"replayed_ms": round(replayed, 4), "with_host_sync_ms": round(with_sync, 4)}
    model.set_attn_implementation(NAME)
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
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.random_shape:
        model = random_model(args.random_shape, args.device, args.dtype)
    else:
        model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = []
    for batch_size in (int(b) for b in args.batch_size.split(",")):
        for attention in ("sdpa", NAME):
            costs = step_costs(model, attention, batch_size, args.prompt_tokens, args.replays)
            rows.append({"batch_size": batch_size, "attention": attention, **costs})
            print(json.dumps(rows[-1]), flush=True)
    record = {"model": args.random_shape or args.model, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
              "torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "rows": rows}
    with open(args.out, "w") as file:
        json.dump(record, file, indent=1)


if __name__ == "__main__":
    main()
