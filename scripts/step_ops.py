"""Device ops per step: how many aten ops one engine step dispatches, by step shape, and where they come from.

At batch 1 a step is launch-bound on a GPU: a captured step replays one kernel per op (uncompiled), so the op count
of a step is most of its cost. This counts the ops of one step of the embedded model's engine, eagerly on the CPU
(the same ops a CUDA graph records, views and allocations left out), for a plain step and the device-drafting steps `auto` runs,
and lists the source lines that dispatch the most.

    python scripts/step_ops.py [--top 20]
"""

from __future__ import annotations

import argparse
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lookahead_decoding as ld
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.models import load_default_model
from lookahead_decoding.sampling_params import SamplingParams

SHAPES = {
    "plain": AUTOREGRESSIVE,
    "device tree (B=63 K=12)": ld.LookaheadConfig(device_drafts=True),
    "device tree + window (W=8 N=4 G=4)": ld.LookaheadConfig(window=8, ngram=4, guesses=4, device_drafts=True),
}
# Ops that launch no kernel where their output is a view of their input (reshape copies where it cannot view), and
# allocations.
VIEWS = {"view", "_unsafe_view", "reshape", "as_strided", "slice", "select", "unsqueeze", "squeeze", "expand",
         "expand_as", "transpose", "t", "permute", "alias", "detach", "_reshape_alias", "unbind", "split", "narrow",
         "lift_fresh", "unflatten", "view_as", "squeeze_", "unsqueeze_"}
ALLOCATIONS = {"empty", "empty_strided"}


def storages(value) -> set[int]:
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched, each under the innermost source line of this project or transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        inputs = set().union(*(storages(arg) for arg in args))
        if name not in ALLOCATIONS and not (name in VIEWS and storages(output) <= inputs):
            frame = next((f for f in reversed(traceback.extract_stack())
                          if "lookahead_decoding" in f.filename or "transformers" in f.filename), None)
            self.lines["?" if frame is None else f"{frame.filename.split('/')[-1]}:{frame.lineno} {frame.name}"] += 1
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=20, help="source lines listed per shape (default: 20)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the row samples at this temperature (default: 0, greedy)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_default_model()
    sampled = args.temperature > 0
    engine = StaticStep(model, list(SHAPES.values()), 1024, sampling=sampled)
    prompt = tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids[0].tolist()
    with torch.inference_mode():
        engine.prefill_rows({0: prompt}, {0: SamplingParams(temperature=args.temperature, seed=0)} if sampled else None)
        for shape, name in enumerate(SHAPES):
            engine.replayable(shape)()  # once first: a layer's first forward allocates
            with OpCounter() as counter:
                engine.replayable(shape)()
            print(f"{name}: {sum(counter.lines.values())} ops")
            for line, count in counter.lines.most_common(args.top):
                print(f"  {count:5d}  {line}")


if __name__ == "__main__":
    main()
