"""Device ops per step: how many aten ops one engine step dispatches, by step shape, and where they come from.

At batch 1 a step is launch-bound on a GPU: a captured step replays one kernel per op (uncompiled), so the op count
of a step is most of its cost. This counts the ops of one step of the embedded model's engine, eagerly on the CPU
(the same ops a CUDA graph records, view ops left out), for a plain step and the device-drafting steps `auto` runs,
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

SHAPES = {
    "plain": AUTOREGRESSIVE,
    "device tree (B=63 K=12)": ld.LookaheadConfig(device_drafts=True),
    "device tree + window (W=8 N=4 G=4)": ld.LookaheadConfig(window=8, ngram=4, guesses=4, device_drafts=True),
}
# Ops that launch no kernel: they only make views or allocate.
NO_KERNEL = {"view", "_unsafe_view", "reshape", "as_strided", "slice", "select", "unsqueeze", "squeeze", "expand",
             "transpose", "t", "permute", "alias", "detach", "empty", "empty_strided", "_reshape_alias", "unbind",
             "split", "narrow", "lift_fresh", "unflatten", "view_as", "expand_as", "squeeze_", "unsqueeze_"}


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched, each under the innermost source line of this project or transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL:
            frame = next((f for f in reversed(traceback.extract_stack())
                          if "lookahead_decoding" in f.filename or "transformers" in f.filename), None)
            self.lines["?" if frame is None else f"{frame.filename.split('/')[-1]}:{frame.lineno} {frame.name}"] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=20, help="source lines listed per shape (default: 20)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_default_model()
    engine = StaticStep(model, list(SHAPES.values()), 1024)
    prompt = tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids[0].tolist()
    with torch.inference_mode():
        engine.prefill_rows({0: prompt})
        for shape, name in enumerate(SHAPES):
            engine.replayable(shape)()  # once first: a layer's first forward allocates
            with OpCounter() as counter:
                engine.replayable(shape)()
            print(f"{name}: {sum(counter.lines.values())} ops")
            for line, count in counter.lines.most_common(args.top):
                print(f"  {count:5d}  {line}")


if __name__ == "__main__":
    main()
