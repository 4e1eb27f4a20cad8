"""Where a fused step's time goes: device time per kind of work, for `ar-graph` and `lookahead` on one prompt.

The step runs un-captured under torch.profiler (a CUDA graph replays the same kernels). Uncompiled, every kernel
is attributed to the aten op that launched it; with --compile most work runs in fused kernels that no aten op
launches, so the kernels themselves are listed too (on CUDA). The profile covers `active` decode steps after the
prefill and a few warm-up steps. Each entry also gives what the step costs as the engine runs it: the captured
step (a CUDA graph on GPU, compiled with --compile; eager elsewhere) replayed back to back, host sync excluded,
at each attention width that decoding read, weighted by its steps.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from ..cli.common import config_dict
from ..decoding import decode
from ..config import AUTOREGRESSIVE, LookaheadConfig
from ..decoding import resolve_plan
from ..engine import StaticStep
from ..runners import engine_length
from .methods import lookahead_config
from .runner import encode_all, environment, prepare, run_config, synchronize

WARMUP_STEPS = 3
TIMED_REPLAYS = 100

# Kind of work -> parts of the names of the aten ops that do it; the first match wins, and ops matching none are
# elementwise work (norms, rotary, activations, the mask, verification's comparisons).
KINDS = {
    "matmul (projections, MLP, LM head)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "attention"),
    "KV cache writes and commit (index copies)": ("aten::index",),
    "tensor copies (K/V head expansion, casts)": ("aten::copy_", "aten::clone", "aten::contiguous"),
    "argmax (verification, window update)": ("aten::argmax",),
}
OTHER = "elementwise and the rest"


def kind_of(op_name: str) -> str:
    for kind, patterns in KINDS.items():
        if any(pattern in op_name for pattern in patterns):
            return kind
    return OTHER


class ProfiledRunner:
    """A StepRunner wrapper that advances the profiler's schedule after the prefill and every step."""

    def __init__(self, runner, profiler) -> None:
        self.runner, self.layouts, self.adapter, self.profiler, self.steps = runner, runner.layouts, runner.adapter, profiler, 0
        self.predictions, self.batch_size = runner.predictions, runner.batch_size
        self.sampler = getattr(runner, "sampler", None)
        self.takes_token_rows = getattr(runner, "takes_token_rows", False)

    def prefill_rows(self, prompts, sampling=None):
        first = self.runner.prefill_rows(prompts, sampling)
        self.profiler.step()
        return first

    def step_rows(self, shape, steps, histories, overlap=None):
        outcomes = self.runner.step_rows(shape, steps, histories, overlap)
        self.steps += 1
        self.profiler.step()
        return outcomes


class StepClock:
    """A StepRunner wrapper (of a `StaticStep`) that times decoding from its first step to its last, host work
    between steps included and the prefill not; pipelined steps too (each launch is a step; the clock stops when
    the last outcome has been read). `widths` counts the steps by attention width, as the device ran them."""

    def __init__(self, runner) -> None:
        self.runner, self.steps, self.began, self.ended = runner, 0, 0.0, 0.0
        self.widths: Counter[int] = Counter()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _launching(self) -> None:
        if self.steps == 0:
            self.began = time.perf_counter()
        self.steps += 1

    def _launched(self, launched):
        self.widths[launched.width] += 1
        return launched

    def step_rows(self, shape, steps, histories, overlap=None):
        launched = self.launch_rows(shape, steps, histories)  # (as StaticStep.step_rows, seen by the clock)
        if overlap is not None:
            overlap(launched.busy)
        return self.finish_rows(launched)

    def launch_rows(self, *args):
        self._launching()
        return self._launched(self.runner.launch_rows(*args))

    def chain(self, *args):
        self._launching()
        return self._launched(self.runner.chain(*args))

    def finish_rows(self, launched):
        outcomes = self.runner.finish_rows(launched)
        self.ended = time.perf_counter()
        return outcomes

    @property
    def ms_per_step(self) -> float:
        return (self.ended - self.began) / max(self.steps, 1) * 1e3


def time_decoding(model, prompts: list[list[int]], max_new_tokens: int, config, engine: StaticStep
                  ) -> tuple[float, Counter[int]]:
    """Wall milliseconds per step of greedy decoding of `prompts` on `engine` as the library runs it (captured on
    CUDA), drafting and bookkeeping included; and its steps by attention width."""
    clock = StepClock(engine)
    decode(model, prompts, max_new_tokens, config, runner=clock)
    return clock.ms_per_step, clock.widths


def profile_config(model, prompts: list[list[int]], max_new_tokens: int, engine: StaticStep, active: int,
                   compile: bool) -> dict:
    """Device (CPU on CPU) time per step by kind of work, over `active` steps of greedy generation of `prompts`
    (one per engine row) by an uncaptured `engine`."""
    on_cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    config = engine.layouts[0].config
    # wait=1 skips the prefill; the schedule then records `active` steps after the warm-up.
    with profile(activities=activities, schedule=schedule(wait=1, warmup=WARMUP_STEPS, active=active, repeat=1)) as prof:
        runner = ProfiledRunner(engine, prof)
        decode(model, prompts, max_new_tokens, config, runner=runner)
    profiled = min(active, runner.steps - WARMUP_STEPS)
    if profiled <= 0:
        raise ValueError(f"the generation ended after {runner.steps} steps, before the profiled steps; "
                         "raise --max-new-tokens or use a longer prompt")
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        self_time = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if self_time > 0 and event.key.startswith("aten::"):
            per_op[event.key] += self_time / profiled
    per_kernel: dict[str, float] = defaultdict(float)
    kernel_count = 0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kernel_count += 1
            per_kernel[event.name] += event.time_range.elapsed_us() / profiled
    per_kind: dict[str, float] = defaultdict(float)
    if compile:  # fused kernels have no aten op: only the kernels' own total is meaningful
        per_kind["all kernels (compiled)"] = sum(per_kernel.values())
    else:
        for op, microseconds in per_op.items():
            per_kind[kind_of(op)] += microseconds
    top_ops = sorted(per_op.items(), key=lambda item: -item[1])[:12]
    return {
        **config_dict(config),
        "step_tokens": engine.layouts[0].size,
        "cache_slots": engine.cache.layers[0].max_cache_len,
        "profiled_steps": profiled,
        "timer": "device" if on_cuda else "cpu",
        "microseconds_per_step": sum(per_kind.values()),
        "compiled": compile,
        "kernels_per_step": kernel_count / profiled if on_cuda else None,
        "by_kind": dict(sorted(per_kind.items(), key=lambda item: -item[1])),
        "top_ops": dict(top_ops),
        "top_kernels": dict(sorted(per_kernel.items(), key=lambda item: -item[1])[:20]),
    }


def time_captured_step(engine: StaticStep, prompts: list[list[int]], widths: Counter[int]) -> float:
    """Milliseconds per step of `engine`'s step as decoding ran it (captured on CUDA), replayed back to back
    after the prompts' prefill, host sync excluded: the device-only cost. Each attention width decoding read
    (`widths`: steps by width) is timed apart and weighted by its steps: a step over the whole cache costs more
    than one over the slots its rows fill. The step's inputs are zeros, which decode no row, so no replay moves a
    row on (a step that drafts on the device would otherwise accept its own drafts and run past the cache): the
    cost is the same for any inputs (fixed shapes)."""
    device = engine.adapter.device
    milliseconds = {}
    with torch.inference_mode():
        engine.prefill_rows(dict(enumerate(prompts)))
        engine.inputs[0].zero_()  # what the decoding before left there decodes its rows
        for width in widths:
            step = engine.replayable(0, width=width)
            step()  # a first run outside the timing
            synchronize(device)
            start = time.perf_counter()
            for _ in range(TIMED_REPLAYS):
                step()
            synchronize(device)
            milliseconds[width] = (time.perf_counter() - start) / TIMED_REPLAYS * 1e3
    return sum(milliseconds[width] * steps for width, steps in widths.items()) / widths.total()


def run_profile(args, model=None, tokenizer=None) -> dict:
    """`--profile`: profile plain decoding (the ar-graph step) and lookahead on the dataset's first prompt, or on
    its first B prompts side by side with --batch-size B."""
    prompts, model, tokenizer = prepare(args, model, tokenizer)
    batch_size = args.batch_size[0] if args.batch_size else 1
    if len(prompts) < batch_size:
        raise ValueError(f"--profile --batch-size {batch_size} needs {batch_size} prompts, the dataset gave "
                         f"{len(prompts)}")
    config = lookahead_config(args)
    if not isinstance(config, LookaheadConfig):  # auto: the widest shape of the calibrated plan
        config = resolve_plan(model, config, batch_size=batch_size).shapes[-1]
    encoded = encode_all(tokenizer, prompts[:batch_size], model.device)
    token_lists = [item.input_ids[0].tolist() for item in encoded]
    length = engine_length(model, max(map(len, token_lists)) + args.max_new_tokens)
    entries = {}
    for label, cfg in (("ar-graph", AUTOREGRESSIVE), ("lookahead", config)):
        # One engine per method: profiled uncaptured first, then captured and timed (one compilation).
        engine = StaticStep(model, cfg, length, cuda_graph=False, compile=bool(args.compile), batch_size=batch_size,
                            predictions=8 if cfg.verifies else 0)
        entry = profile_config(model, token_lists, args.max_new_tokens, engine, args.profile_steps,
                               compile=bool(args.compile))
        if model.device.type == "cuda":
            engine.capture()  # (already compiled, if asked) decoding and the replays run the captured steps
        entry["wall_step_ms"], widths = time_decoding(model, token_lists, args.max_new_tokens, cfg, engine)
        entry["steps_by_width"] = dict(sorted(widths.items()))
        entry["captured_step_ms"] = time_captured_step(engine, token_lists, widths)
        # What the device-only step does not explain: drafting, bookkeeping, launches and syncs.
        entry["host_share"] = 1.0 - entry["captured_step_ms"] / entry["wall_step_ms"]
        entries[label] = entry
    return {
        "environment": environment(model, args),
        "config": run_config(args),
        "profile": {"dataset": args.dataset, "prompt_index": encoded[0].prompt.index, "batch_size": batch_size,
                    "methods": entries},
    }
