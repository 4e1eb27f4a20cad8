"""What starting one row of a batch costs: a one-row prefill on a B-row engine, timed sync to sync (wall) and
under torch.profiler (the sum of its device time), for prompts of several lengths, on the engine `auto` builds for
B rows and on plain decoding's (`ar-graph`). A refill pays this once per admission, beside the batch's steps.

    python scripts/prefill_costs.py --model SmolLM2-135M-Instruct.Q4_1.gguf --batch-size 8
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lookahead_decoding import load_model
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.decoding import resolve_plan
from lookahead_decoding.drafting.sources import make_source
from lookahead_decoding.runners import runner_for

TOKEN = 100  # prompts are runs of consecutive token ids from here: the cost depends on their number only
ENGINE_LENGTH = 600


def device_ms(run) -> float:
    """Milliseconds of device time (CUDA kernels) that `run` launches."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder, .gguf file or Hub name")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lengths", default="60,120,200,300", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    model, _ = load_model(args.model, device="cuda", dtype=args.dtype)
    for label, config in (("lookahead (auto)", "auto"), ("ar-graph", AUTOREGRESSIVE)):
        plan = resolve_plan(model, config, batch_size=args.batch_size)
        runner = runner_for(model, plan.shapes, ENGINE_LENGTH, predictions=make_source(None, plan.shapes)
                            .predictions_wanted, batch_size=args.batch_size)
        with torch.inference_mode():
            # Every row holds a sequence (and the engine captures its graphs) before the timed one-row prefills.
            runner.prefill_rows({row: list(range(TOKEN, TOKEN + 90)) for row in range(args.batch_size)})
            for length in map(int, args.lengths.split(",")):
                prompt = list(range(TOKEN, TOKEN + length))
                walls = []
                for _ in range(args.repeats):
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    runner.prefill_rows({args.batch_size // 2: prompt})
                    torch.cuda.synchronize()
                    walls.append((time.perf_counter() - began) * 1e3)
                device = device_ms(lambda: runner.prefill_rows({args.batch_size // 2: prompt}))
                print(f"{label}: a {length}-token prompt into 1 of {args.batch_size} rows: wall ms "
                      f"{[round(wall, 2) for wall in walls]}, device ms {device:.3f}")


if __name__ == "__main__":
    main()
