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

Methods that are lookahead decoding with some configuration can also run batched (`lookahead bench --batch-size`):
such a method registers its settings, `fn(args) -> (config, source)`, in BATCHED_METHODS too:

    @register_method("my-lookahead", registry=BATCHED_METHODS)
    def my_lookahead_settings(args):
        return LookaheadConfig(5, 4, 5), None
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from ..cli.common import config_from_args
from ..config import AUTOREGRESSIVE, LookaheadConfig
from ..decoding import AUTO, decode, resolve_plan
from ..drafting.sources import make_source
from ..model_adapter import ModelAdapter
from ..runners import runner_for
from ..step import EagerStep

Method = Callable[..., tuple]
METHODS: dict[str, Method] = {}
# name -> fn(args) -> (config, source): the ld.generate settings of a method that decodes batches.
BATCHED_METHODS: dict[str, Callable[..., tuple]] = {}
PLD_TOKENS = 10


def register_method(name: str, registry: dict = METHODS) -> Callable:
    """Decorator adding `fn` to `registry` (METHODS or BATCHED_METHODS) under `name` (later registrations replace
    earlier ones)."""

    def add(fn):
        registry[name] = fn
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


def lookahead_config(args) -> LookaheadConfig | str:
    """The configuration of --window/--ngram/--guesses/--candidate-length, or "auto" when none is given."""
    return config_from_args(args) or AUTO


def histogram(stats) -> dict[str, int]:
    return {str(k): v for k, v in sorted(stats.accepted_histogram.items())}


@register_method("hf-compiled")
def hf_compiled(model, input_ids, max_new_tokens, args):
    """HF's fastest greedy setting: static cache, which `generate` compiles on GPUs by itself."""
    return hf_generate(model, input_ids, max_new_tokens, cache_implementation="static")


class TimedRunner:
    """A StepRunner wrapper adding up the seconds spent in the model: the prefill and every fused step (forward,
    verification, KV commit and the host sync that ends it). The rest of a run is host-side work: drafting,
    window, pool, shape choice and stopping checks."""

    def __init__(self, runner) -> None:
        self.runner, self.layouts, self.adapter, self.model_seconds = runner, runner.layouts, runner.adapter, 0.0
        self.max_length, self.predictions = getattr(runner, "max_length", None), runner.predictions
        self.batch_size, self.sampler = runner.batch_size, getattr(runner, "sampler", None)

    def _timed(self, call, *args):
        start = time.perf_counter()
        result = call(*args)
        self.model_seconds += time.perf_counter() - start
        return result

    def prefill(self, prompt, history):
        return self._timed(self.runner.prefill, prompt, history)

    def step(self, shape, step_ids, tree, history):
        return self._timed(self.runner.step, shape, step_ids, tree, history)

    def prefill_rows(self, prompts, sampling=None):
        return self._timed(self.runner.prefill_rows, prompts, sampling)

    def step_rows(self, shape, steps, histories, overlap=None):
        # The overlapped host work is the loop's, not the model's: its time is taken back out.
        host_seconds = 0.0

        def timed_overlap():
            nonlocal host_seconds
            start = time.perf_counter()
            overlap()
            host_seconds += time.perf_counter() - start

        outcomes = self._timed(self.runner.step_rows, shape, steps, histories,
                               None if overlap is None else timed_overlap)
        self.model_seconds -= host_seconds
        return outcomes


def lookahead_with(config: LookaheadConfig | str, source=None) -> Method:
    """Greedy decoding with `config` ("auto" included) and `source` (None: the default sources) on the runner the
    library picks (the static engine on CUDA, reused across prompts). Rows also get `model_seconds`, the time spent
    in the model (see TimedRunner), the steps taken of each shape and the plan (shapes and their costs)."""

    def run(model, input_ids, max_new_tokens, args):
        plan = resolve_plan(model, config)
        drafts = make_source(source, plan.shapes)  # a fresh source per prompt, as ld.generate makes
        # Sized for the run's --max-new-tokens, so that the short warm-up builds the engine the run uses.
        length = input_ids.shape[1] + max(max_new_tokens, getattr(args, "max_new_tokens", 0))
        runner = TimedRunner(runner_for(model, plan.shapes, length, compile=bool(getattr(args, "compile", False)),
                                        predictions=drafts.predictions_wanted))
        (result,), stats, _ = decode(model, input_ids.tolist(), max_new_tokens, plan, source=drafts, runner=runner)
        sequences = torch.tensor([result.tokens], device=input_ids.device)
        return sequences, stats.steps, {"accepted_histogram": histogram(stats), "shape_steps": dict(stats.shape_steps),
                                        "model_seconds": runner.model_seconds, "plan": plan.describe()}

    return run


@register_method("ar-graph", registry=BATCHED_METHODS)
def autoregressive_settings(args):
    return AUTOREGRESSIVE, None


@register_method("lookahead", registry=BATCHED_METHODS)
def lookahead_settings(args):
    return lookahead_config(args), getattr(args, "source", None)


@register_method("ar-graph")
def autoregressive_graph(model, input_ids, max_new_tokens, args):
    """Plain one-token-per-step greedy decoding on the same engine as lookahead (CUDA graphs on GPU)."""
    return lookahead_with(*autoregressive_settings(args))(model, input_ids, max_new_tokens, args)


@register_method("lookahead")
def lookahead(model, input_ids, max_new_tokens, args):
    """Our lookahead decoding as `ld.generate` runs it: calibrated shapes chosen per step unless W/N/G are given."""
    return lookahead_with(*lookahead_settings(args))(model, input_ids, max_new_tokens, args)


@register_method("lookahead-eager")
def lookahead_eager(model, input_ids, max_new_tokens, args):
    """Lookahead decoding on the dynamic-cache runner (no static engine, no graphs)."""
    plan = resolve_plan(model, lookahead_config(args))
    drafts = make_source(getattr(args, "source", None), plan.shapes)
    runner = EagerStep(ModelAdapter(model), plan.shapes, predictions=drafts.predictions_wanted)
    (result,), stats, _ = decode(model, input_ids.tolist(), max_new_tokens, plan, source=drafts, runner=runner)
    return torch.tensor([result.tokens], device=input_ids.device), stats.steps, {"accepted_histogram": histogram(stats)}


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


def check_batched(names: list[str]) -> None:
    """Batched runs need methods that decode batches on the library's engine (BATCHED_METHODS)."""
    unbatched = [name for name in names if name not in BATCHED_METHODS]
    if unbatched:
        raise ValueError(f"--batch-size: {', '.join(unbatched)} cannot run batched (one prompt at a time); "
                         f"batched methods: {', '.join(BATCHED_METHODS)}")
