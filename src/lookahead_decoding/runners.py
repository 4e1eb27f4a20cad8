"""Which step runner serves a generation, built once per model, step shapes and length bucket, and reused.

The static engine (`engine.StaticStep`: preallocated cache, CUDA graphs) serves greedy and sampled decoding on CUDA
(an engine built to sample chooses every row's tokens on the device, greedy rows included). Elsewhere the
dynamic-cache `step.EagerStep` serves one sequence: logits processors need its verifiers, sliding-window models its
cache, and on a CPU its attention over the tokens cached so far beats a static cache's attention over every slot
(docs/benchmarks.md). Engines are cached weakly on the model: dropping the model frees them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from .config import LookaheadConfig
from .engine import StaticStep
from .model_adapter import ModelAdapter
from .step import EagerStep, StepRunner
from .plan_cache import cached_plan, calibration_key, is_stale, store_plan
from .sampling_params import SamplingParams
from .tuning import Calibration, StepPlan, calibrate, time_steps, unsorted
from .verification import Verifier

STATIC_ENGINE_DEVICES = ("cuda",)
# Engines are sized to a bucket of prompt + new tokens. Every step attends over the whole static cache, so
# buckets are tight where that costs (CPU); on CUDA, building an engine costs captures (and a compilation), so
# one bucket serves most prompts.
ENGINE_LENGTH_STEP = {"cuda": 1024}
DEFAULT_ENGINE_LENGTH_STEP = 128

# What a runner that samples is timed with: the request chat front-ends send most (an eager sampler's cost depends
# on which stages the rows use).
CALIBRATION_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9)

_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(shapes, length, compile): engine}
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {calibration key: StepPlan}
_runner_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runner -> {sampled: its shapes timed on it}


def uses_static_engine(model, verifier: Verifier | None = None) -> bool:
    """Whether decoding of `model` runs on the static engine: on CUDA, no logits processors (`verifier`), and no
    sliding-window attention."""
    adapter = ModelAdapter(model)
    return verifier is None and adapter.device.type in STATIC_ENGINE_DEVICES and adapter.sliding_window is None


def engine_length(model, length: int) -> int:
    """The engine size (max_length) that serves sequences of `length` tokens: `length` rounded up to a bucket."""
    step = ENGINE_LENGTH_STEP.get(model.device.type, DEFAULT_ENGINE_LENGTH_STEP)
    max_length = -(-length // step) * step
    context = ModelAdapter(model).context_length
    return max_length if context is None else min(max_length, context)


def static_engine(model, shapes: Sequence[LookaheadConfig], length: int, compile: bool = False,
                  predictions: int = 0, batch_size: int = 1, sampling: bool = False) -> StaticStep:
    """The cached static engine for `shapes` and `batch_size` rows that fits `length` tokens, greedy or built to
    sample (`sampling`); built (and captured) once."""
    max_length = engine_length(model, length)
    engines = _engines.setdefault(model, {})
    key = (tuple(shapes), max_length, compile, predictions, batch_size, sampling)
    if key not in engines:
        engines[key] = StaticStep(model, shapes, max_length, compile=compile, predictions=predictions,
                                  batch_size=batch_size, sampling=sampling)
    return engines[key]


def runner_for(model, shapes: Sequence[LookaheadConfig], length: int, verifier: Verifier | None = None,
               compile: bool = False, predictions: int = 0, batch_size: int = 1, sampling: bool = False
               ) -> StepRunner:
    """The runner for a generation of up to `length` tokens with these step shapes; `predictions`: the model's
    top next tokens to report at every computed row, for the sources that recycle them; `sampling`: some row
    samples or has penalties (its `SamplingParams` come with its prompt). A batch runs on the static engine (its
    rows hold sequences of different lengths), and so do shapes that draft on the device (on the cached engine, whose
    table outlives the call); with a verifier (logits processors), eagerly."""
    device_drafts = any(shape.device_drafts for shape in shapes)  # (drafting on the device needs the engine's table)
    if uses_static_engine(model, verifier) or (device_drafts and verifier is None):
        return static_engine(model, shapes, length, compile, predictions, batch_size, sampling)
    if batch_size > 1 or device_drafts:
        return StaticStep(model, shapes, engine_length(model, length), compile=compile, predictions=predictions,
                          batch_size=batch_size, verifier=verifier, cuda_graph=False, sampling=sampling)
    return EagerStep(ModelAdapter(model), shapes, verifier, predictions, sampling)


def runner_kind(model, verifier: Verifier | None, batch_size: int, sampling: bool = False) -> str:
    """Which runner decodes: "static" (on CUDA), "dynamic" (one sequence elsewhere) or, for a batch, "static" /
    "batch eager" with the batch size; "sampling" where the runner chooses tokens with the rows' parameters (its
    steps cost more)."""
    if uses_static_engine(model, verifier):
        kind = "static"
    else:
        kind = "dynamic" if batch_size == 1 else "batch eager"
    kind = f"{kind} sampling" if sampling else kind
    return kind if batch_size == 1 else f"{kind} x{batch_size}"


def auto_plan(model, verifier: Verifier | None = None, batch_size: int = 1, sampling: bool = False) -> StepPlan:
    """The calibrated step plan for `model` on the runner kind it will use at this batch size: from memory, from
    the cache file, or measured now (and stored)."""
    kind = runner_kind(model, verifier, batch_size, sampling)
    key = calibration_key(model, kind)
    plans = _plans.setdefault(model, {})
    if key not in plans or is_stale(key):
        plan = cached_plan(key, ModelAdapter(model).context_length)
        if plan is None:
            plan = calibrate_model(model, uses_static_engine(model, verifier), batch_size, sampling=sampling).plan
            store_plan(key, plan)
        plans[key] = plan
    return plans[key]


def calibrate_model(model, static: bool, batch_size: int = 1, exhaustive: bool = False,
                    sampling: bool = False) -> Calibration:
    """Measure the candidate shapes on the runner kind decoding uses (uncompiled; compiling scales every step
    alike), with `batch_size` rows, greedy or built to sample, and choose the plan (`exhaustive`: time every shape
    fully, see `calibrate`)."""
    adapter = ModelAdapter(model)
    if static or batch_size > 1:
        length = engine_length(model, 1024)
        make_runner = lambda shapes: StaticStep(model, shapes, length, batch_size=batch_size,  # noqa: E731
                                                cuda_graph=None if static else False, sampling=sampling)
    else:
        make_runner = lambda shapes: EagerStep(adapter, shapes, sampling=sampling)  # noqa: E731
    return calibrate(make_runner, adapter.vocab, exhaustive, CALIBRATION_SAMPLING if sampling else None)


def runner_plan(runner: StepRunner, sampling: bool = False) -> StepPlan:
    """A plan of `runner`'s own shapes, each with what one step costs on that very runner, measured once per runner:
    greedy, or, when `sampling` and the runner is built to sample, with sampling rows (`CALIBRATION_SAMPLING`), with
    greedy rows and with rows at its temperature alone (`StepPlan.greedy_costs_ms`, `unsorted_costs_ms`)."""
    shapes = tuple(layout.config for layout in runner.layouts)
    if len(shapes) == 1:  # nothing to choose between
        return StepPlan(shapes, (1.0,))
    sampled = sampling and getattr(runner, "sampler", None) is not None
    plans = _runner_plans.setdefault(runner, {})
    if sampled not in plans:
        vocab = runner.adapter.vocab
        greedy = time_steps(runner, vocab)
        if sampled:
            plans[sampled] = StepPlan(shapes, time_steps(runner, vocab, sampling=CALIBRATION_SAMPLING), greedy,
                                      time_steps(runner, vocab, sampling=unsorted(CALIBRATION_SAMPLING)))
        else:
            plans[sampled] = StepPlan(shapes, greedy)
    return plans[sampled]


def compiled_plan(plan: StepPlan, runner: StepRunner, sampling: bool = False) -> StepPlan:
    """`auto`'s calibrated `plan` as `runner`, built for its shapes, runs it: where the runner is compiled, its
    shapes timed again on it (`runner_plan`), else `plan` itself. Calibration times uncompiled engines (and caches
    the plan across runs), but compiling does not cheapen every shape alike: a compiled engine fuses each step's
    kernels and attends over its whole cache rather than the narrowest width that holds the rows (H100, the
    embedded model, batch 1: the plain step went from 3.55 to about 2.3 ms, the device tree from 5.21 to about
    3.2; docs/benchmarks.md, "A compiled server")."""
    if not getattr(runner, "compile", False) or len(plan.shapes) == 1:
        return plan
    return runner_plan(runner, sampling)
