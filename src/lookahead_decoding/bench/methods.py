"""The decoding methods the benchmark compares, in an open registry.

A method is `fn(model, input_ids, max_new_tokens, args) -> (sequences, steps)` or `(sequences, steps, extra)`:
`sequences` [1, prompt_len + new_tokens] as `model.generate` returns them, `steps` the forward passes after the
prefill, `extra` a dict of additional per-row fields for the JSON (for example a histogram). `args` is the parsed
command line (an argparse Namespace). Adding one:

    @register_method("my-method")
    def my_method(model, input_ids, max_new_tokens, args):
        with count_forwards(model) as calls:
            sequences = ...
        return sequences, calls.steps
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from ..config import LookaheadConfig
from ..decoding import decode, generate
from ..engine import AUTOREGRESSIVE, StaticStep
from ..layout import StepLayout
from ..model_adapter import ModelAdapter
from ..step import EagerStep

Method = Callable[..., tuple]
METHODS: dict[str, Method] = {}
PLD_TOKENS = 10


def register_method(name: str) -> Callable[[Method], Method]:
    """Decorator adding `fn` to METHODS under `name` (later registrations replace earlier ones)."""

    def add(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return add


class ForwardCounter:
    """Counts calls of a module's forward; `steps` is the count less the first call (the prefill)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, inputs) -> None:
        self.calls += 1

    @property
    def steps(self) -> int:
        return max(self.calls - 1, 0)


@contextmanager
def count_forwards(model):
    """Counts the model's forward calls (a forward pre-hook) while the block runs."""
    counter = ForwardCounter()
    handle = model.register_forward_pre_hook(counter)
    try:
        yield counter
    finally:
        handle.remove()


def hf_generate(model, input_ids, max_new_tokens: int, **kwargs) -> tuple[torch.Tensor, int]:
    """Greedy `model.generate` with the extra kwargs; steps counted by the forward hook."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    with count_forwards(model) as counter:
        sequences = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **kwargs,
        )
    return sequences, counter.steps


@register_method("greedy")
def greedy(model, input_ids, max_new_tokens, args):
    return hf_generate(model, input_ids, max_new_tokens)


@register_method("pld")
def prompt_lookup(model, input_ids, max_new_tokens, args):
    return hf_generate(model, input_ids, max_new_tokens, prompt_lookup_num_tokens=PLD_TOKENS)


def lookahead_config(args) -> LookaheadConfig:
    """LookaheadConfig from args.window/ngram/guesses/candidate_length; the library default for any that is None
    or absent."""
    given = {name: getattr(args, name, None) for name in ("window", "ngram", "guesses", "candidate_length")}
    return LookaheadConfig(**{name: value for name, value in given.items() if value is not None})


def histogram(stats) -> dict[str, int]:
    return {str(k): v for k, v in sorted(stats.accepted_histogram.items())}


@register_method("hf-compiled")
def hf_compiled(model, input_ids, max_new_tokens, args):
    """HF's fastest greedy setting: static cache, which `generate` compiles on GPUs by itself."""
    return hf_generate(model, input_ids, max_new_tokens, cache_implementation="static")


# Engines are built per bucket of prompt + new tokens and reused; the warm-up builds (captures, compiles) one per
# bucket the run needs, so none is built inside a timed run. Every step attends over the whole static cache, so
# buckets are tight on CPU; on CUDA, where building one costs a compilation, one bucket serves every prompt of
# the bundled datasets at 256 new tokens.
ENGINE_LENGTH_STEP = {"cuda": 1024}
DEFAULT_ENGINE_LENGTH_STEP = 128
_engines: dict[tuple, StaticStep] = {}


def engine_length(model, length: int) -> int:
    """The engine size (max_length) that serves sequences of `length` tokens: `length` rounded up to a bucket."""
    step = ENGINE_LENGTH_STEP.get(model.device.type, DEFAULT_ENGINE_LENGTH_STEP)
    max_length = -(-length // step) * step
    context = ModelAdapter(model).context_length
    return max_length if context is None else min(max_length, context)


def static_engine(model, config: LookaheadConfig, length: int, args) -> StaticStep:
    """The (cached) fixed-shape engine for `config` that fits `length` tokens; captured once, replayed after."""
    max_length = engine_length(model, length)
    compile_step = bool(getattr(args, "compile", False))
    key = (id(model), config, max_length, compile_step)
    if key not in _engines:
        _engines[key] = StaticStep(model, config, max_length, compile=compile_step)
    return _engines[key]


class TimedRunner:
    """A StepRunner wrapper adding up the seconds spent in the model: the prefill and every fused step (forward,
    verification, KV commit and the host sync that ends it). The rest of a run is host-side work: drafting,
    window, pool and stopping checks."""

    def __init__(self, runner) -> None:
        self.runner, self.layout, self.model_seconds = runner, runner.layout, 0.0

    def _timed(self, call, *args):
        start = time.perf_counter()
        result = call(*args)
        self.model_seconds += time.perf_counter() - start
        return result

    def prefill(self, prompt, history):
        return self._timed(self.runner.prefill, prompt, history)

    def step(self, step_ids, num_candidates, history):
        return self._timed(self.runner.step, step_ids, num_candidates, history)


def lookahead_with(config: LookaheadConfig) -> Method:
    """Greedy decoding on the static engine with `config`; the dynamic-cache path where the engine cannot run.
    Rows also get `model_seconds`, the time spent in the model (see TimedRunner)."""

    def run(model, input_ids, max_new_tokens, args):
        adapter = ModelAdapter(model)
        if adapter.sliding_window is not None:
            runner = TimedRunner(EagerStep(adapter, StepLayout.build(config, adapter.device)))
        else:
            # Sized for the run's --max-new-tokens, so that the short warm-up builds the engine the run uses.
            new_tokens = max(max_new_tokens, getattr(args, "max_new_tokens", 0))
            runner = TimedRunner(static_engine(model, config, input_ids.shape[1] + new_tokens, args))
        out = decode(model, input_ids, max_new_tokens, config, runner=runner)
        return out.sequences, out.stats.steps, {"accepted_histogram": histogram(out.stats),
                                                "model_seconds": runner.model_seconds}

    return run


@register_method("ar-graph")
def autoregressive_graph(model, input_ids, max_new_tokens, args):
    """Plain one-token-per-step greedy decoding on the same engine as lookahead (CUDA graphs on GPU)."""
    return lookahead_with(AUTOREGRESSIVE)(model, input_ids, max_new_tokens, args)


@register_method("lookahead")
def lookahead(model, input_ids, max_new_tokens, args):
    """Our lookahead decoding, on the fast engine."""
    return lookahead_with(lookahead_config(args))(model, input_ids, max_new_tokens, args)


@register_method("lookahead-eager")
def lookahead_eager(model, input_ids, max_new_tokens, args):
    """Lookahead decoding through `lookahead_decoding.generate` (dynamic cache, no graphs)."""
    out = generate(model, input_ids, max_new_tokens, config=lookahead_config(args))
    return out.sequences, out.stats.steps, {"accepted_histogram": histogram(out.stats)}


def parse_methods(text: str) -> list[str]:
    """Method names from a comma-separated list; unknown or repeated names are an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--methods is empty")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {text}")
    return names
