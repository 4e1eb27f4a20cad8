"""Where a batch's wall time goes, method against method: `ld.generate` of many prompts through B rows, timed, then
once more under cProfile, for plain decoding on the engine (`ar-graph`) and for lookahead (`auto`).

Printed per method: steps, tokens, wall time per step; then, from runs for each --refill-patience (alternated,
twice), the throughput and the prefills (the first rows' and every refill's: how many, of how many rows, and their
wall time, timed between device synchronisations, so that a refill does not count the step it waits behind) and
what is left per step; then the cumulative and own time per step of the decoding loop's parts (admitting rows, the
step's one host sync, drafting, recording) and the largest own times. On CUDA the sync (`tolist`) is where the host
waits for the device. The prompts go through the chat template as `lookahead bench` sends them.

    python scripts/batch_profile.py --model SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --dataset gsm8k \
        --data-file test.jsonl --limit 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from collections import Counter

import torch

import lookahead_decoding as ld
from lookahead_decoding.bench.data import load_prompts
from lookahead_decoding.bench.runner import encode_all
from lookahead_decoding.cli.common import load_from_args
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.decoding import resolve_plan, schedule
from lookahead_decoding.drafting.sources import make_source
from lookahead_decoding.runners import runner_for
from lookahead_decoding.tuning import shape_name

METHODS = {"ar-graph": AUTOREGRESSIVE, "lookahead": "auto"}
PARTS = ("tolist", "_admit", "prefill_rows", "step_rows", "launch_rows", "chain", "finish_rows", "synchronize",
         "_step_behind", "use_device_time", "catch_up", "observe_text", "draft", "propose", "build_tree", "record",
         "_record_rows", "_record_planned", "commit", "observe_rows", "plan_step", "batch_extra", "best_shape",
         "_retire")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PrefillClock:
    """A StepRunner wrapper that times each prefill between device synchronisations and counts its new rows."""

    def __init__(self, runner) -> None:
        self.runner, self.seconds, self.rows = runner, 0.0, Counter()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def prefill_rows(self, prompts, sampling=None):
        synchronize(self.runner.adapter.device)
        began = time.perf_counter()
        outcomes = self.runner.prefill_rows(prompts, sampling)  # (it reads the first tokens back: a sync)
        self.seconds += time.perf_counter() - began
        self.rows[len(prompts)] += 1
        return outcomes


def prefill_split(model, prompts: list[list[int]], config, batch_size: int, max_new_tokens: int,
                  refill_patience: float) -> str:
    """A run of `decode` as ld.generate runs it, on the engine it would pick, with its prefills timed apart; its
    free rows wait `refill_patience` for company (`scheduler.REFILL_PATIENCE`)."""
    plan = resolve_plan(model, config, batch_size=batch_size)
    predictions = make_source(None, plan.shapes).predictions_wanted
    length = max(len(prompt) for prompt in prompts) + max_new_tokens
    clock = PrefillClock(runner_for(model, plan.shapes, length, predictions=predictions, batch_size=batch_size))
    synchronize(clock.adapter.device)
    began = time.perf_counter()
    scheduler = schedule(model, prompts, max_new_tokens, plan, runner=clock)
    scheduler.refill_patience = refill_patience
    for _ in scheduler.run():
        pass
    synchronize(clock.adapter.device)
    seconds = time.perf_counter() - began
    stats, plan = scheduler.finish(seconds), scheduler.plan
    outside = seconds - clock.seconds
    split = (f"  patience {refill_patience}: {stats.new_tokens / seconds:,.0f} tok/s; prefills: "
             f"{sum(clock.rows.values())} ({dict(sorted(clock.rows.items()))} by new rows), "
             f"{clock.seconds:.3f} s of {seconds:.3f} s; "
             f"{outside / stats.steps * 1e3:.2f} ms per step outside them")
    if len(plan.shapes) == 1:  # (a one-shape plan is not calibrated)
        return split
    names = [shape_name(shape) for shape in plan.shapes]
    calibrated = sum(plan.costs_ms[names.index(name)] * count for name, count in stats.shape_steps.items()) / 1e3
    return f"{split}; the steps at their calibrated costs {calibrated:.3f} s, the rest {outside - calibrated:.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file or a local model folder (default: the embedded model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dataset", required=True, choices=("humaneval", "gsm8k", "mtbench"))
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--refill-patience", default="1.0",
                        help="comma-separated values to run the prefill split with (scheduler.REFILL_PATIENCE)")
    args = parser.parse_args()
    model, tokenizer = load_from_args(args)
    device = torch.device(args.device)
    prompts = [encoded.input_ids[0].tolist()
               for encoded in encode_all(tokenizer, load_prompts(args.dataset, args.data_file, args.limit), "cpu")]
    for config in METHODS.values():  # calibration, engine build and capture, outside the timing
        ld.generate(model, prompts[: args.batch_size], max_new_tokens=8, batch_size=args.batch_size, config=config)
    for name, config in METHODS.items():
        synchronize(device)
        began = time.perf_counter()
        out = ld.generate(model, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          config=config)
        synchronize(device)
        seconds = time.perf_counter() - began
        steps = out.stats.steps
        print(f"{name}: {steps} steps, {out.stats.new_tokens} tokens, {seconds:.2f} s, "
              f"{seconds / steps * 1e3:.2f} ms per step, {dict(out.stats.shape_steps)}")
        prefill_split(model, prompts, config, args.batch_size, args.max_new_tokens, 0.0)  # builds the engine
        for patience in [float(value) for value in args.refill_patience.split(",")] * 2:
            print(prefill_split(model, prompts, config, args.batch_size, args.max_new_tokens, patience))
        profiler = cProfile.Profile()
        profiler.enable()
        ld.generate(model, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, config=config)
        synchronize(device)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        print("  under cProfile, per step (ms): cumulative / own")
        for (path, _, function), (_, calls, own, cumulative, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
            label = f"{os.path.basename(path)}:{function}"
            if function in PARTS or label.endswith("tolist' of 'torch._C.TensorBase' objects>"):
                print(f"  {cumulative / steps * 1e3:8.3f} {own / steps * 1e3:8.3f}  {calls:7d} calls  {label}")


if __name__ == "__main__":
    main()
