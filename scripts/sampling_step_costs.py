"""What a step costs by the sampling stages its rows use: greedy, a temperature alone, with top-p, with top-k.

`auto` times an engine built to sample three times: with greedy rows, with rows sampling at temperature 0.7 and
top-p 0.9 (`runners.CALIBRATION_SAMPLING`), and at the temperature alone (`StepPlan.unsorted_costs_ms`, since
2026-12-06: before, every step where some row sampled was judged by the top-p costs). This times the same engine's
shapes for each set of stages, top-k's among them, on a randomly initialised model of a named shape (the cost of a
step does not depend on the weights).

    python scripts/sampling_step_costs.py [--shape smollm2-135m] [--device cuda] [--dtype bfloat16] [--compile]
"""

from __future__ import annotations

import argparse

import torch

import lookahead_decoding as ld
from lookahead_decoding.cli.tune import RANDOM_SHAPES, random_model
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.sampling_params import SamplingParams
from lookahead_decoding.tuning import shape_name, time_steps

SHAPES = (AUTOREGRESSIVE, ld.LookaheadConfig(device_drafts=True))
SAMPLINGS = {
    "greedy": None,
    "temperature 0.7": SamplingParams(temperature=0.7),
    "temperature 0.7, top-p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "temperature 0.7, top-k 50": SamplingParams(temperature=0.7, top_k=50),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(RANDOM_SHAPES), default="smollm2-135m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--length", type=int, default=1280, help="the engine's tokens (a server's: 1,024 + 256)")
    parser.add_argument("--compile", action="store_true", help="compile the engine's steps (CUDA)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_model(args.shape, args.device, args.dtype)
    engine = StaticStep(model, SHAPES, args.length, compile=args.compile, sampling=True)
    vocab = model.config.vocab_size
    rows = {name: time_steps(engine, vocab, sampling=sampling) for name, sampling in SAMPLINGS.items()}
    print(f"{args.shape}, {args.dtype}, {args.device}{', compiled' if args.compile else ''}: ms per step")
    print("| sampling | " + " | ".join(shape_name(shape) for shape in SHAPES) + " |")
    print("|---|" + "---|" * len(SHAPES))
    for name, costs in rows.items():
        print(f"| {name} | " + " | ".join(f"{cost:.2f}" for cost in costs) + " |")


if __name__ == "__main__":
    main()
