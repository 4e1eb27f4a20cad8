"""A server's engine without the server: `open_scheduler` as `lookahead serve` builds it (an engine built to sample,
with room for `--max-prompt-tokens` + `--max-new-tokens`), fed one request after another in this process at batch
1, against `ld.generate` on the same prompts. It tells what the engine costs apart from HTTP and the event loop.

    python scripts/server_engine_inprocess.py --model SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \\
        --dataset mtbench --data-file $DATA/question.jsonl --limit 16
"""

from __future__ import annotations

import argparse

import lookahead_decoding as ld
from lookahead_decoding.bench.data import DATASETS, load_prompts
from lookahead_decoding.bench.runner import encode_all, stopwatch
from lookahead_decoding.decoding import eos_set, open_scheduler
from lookahead_decoding.models import load_default_model, resolve_device, resolve_dtype
from lookahead_decoding.scheduler import Request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="humaneval", choices=list(DATASETS))
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="as `lookahead serve` is given")
    parser.add_argument("--model", help="a local model folder or .gguf file (default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="default: bfloat16 on CUDA, float32 elsewhere")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(("bfloat16" if device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype)
    model, tokenizer = load_default_model(device, dtype, path=args.model)
    prompts = [p.input_ids[0].tolist() for p in
               encode_all(tokenizer, load_prompts(args.dataset, args.data_file, args.limit), device)]
    scheduler = open_scheduler(model, 1, args.max_prompt_tokens + args.max_new_tokens)
    print(f"plan: {scheduler.plan.describe()}")

    def serve_one_by_one() -> None:
        for prompt in prompts:
            scheduler.submit(Request(prompt, args.max_new_tokens, eos_set(model), use_memory=False))
            list(scheduler.run())

    for label in ("warm-up", "timed"):  # the first pass records each step shape's graphs
        tokens, steps = scheduler.stats.new_tokens, scheduler.stats.steps
        _, seconds = stopwatch(device, serve_one_by_one)
        tokens, steps = scheduler.stats.new_tokens - tokens, scheduler.stats.steps - steps
        print(f"server's engine, {label}: {tokens} tokens in {steps} steps, {seconds:.3f} s, "
              f"{tokens / seconds:.1f} tokens/s, {1e3 * seconds / steps:.3f} ms per step")
    for label in ("warm-up", "timed"):
        out, seconds = stopwatch(device, lambda: ld.generate(model, prompts, args.max_new_tokens, isolated=True,
                                                             batch_size=1))
        print(f"ld.generate(isolated=True, batch_size=1), {label}: {out.stats.new_tokens} tokens in "
              f"{out.stats.steps} steps, {seconds:.3f} s, {out.stats.new_tokens / seconds:.1f} tokens/s, "
              f"{1e3 * seconds / out.stats.steps:.3f} ms per step")


if __name__ == "__main__":
    main()
