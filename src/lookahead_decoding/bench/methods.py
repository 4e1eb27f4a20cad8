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

A method that can sample registers with `samples=True` and takes `sampling`, the prompt's `SamplingParams`; it is
passed only when the run samples (`lookahead bench --temperature T`), which refuses the methods that cannot:

    @register_method("my-sampler", samples=True)
    def my_sampler(model, input_ids, max_new_tokens, args, sampling=None):
        ...

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
from dataclasses import replace

import torch

from ..cli.common import config_from_args
from ..config import AUTOREGRESSIVE, LookaheadConfig
from ..decoding import AUTO, decode, resolve_plan
from ..drafting.sources import make_source
from ..model_adapter import ModelAdapter
from ..runners import compiled_plan, runner_for
from ..sampling_params import SamplingParams
from ..step import EagerStep

Method = Callable[..., tuple]
METHODS: dict[str, Method] = {}
# name -> fn(args) -> (config, source): the ld.generate settings of a method that decodes batches.
BATCHED_METHODS: dict[str, Callable[..., tuple]] = {}
# The METHODS that take `sampling` (every batched method samples, through ld.generate's settings).
SAMPLING_METHODS: set[str] = set()
# In a sampling run, a method whose name says greedy is reported under what it then does.
SAMPLING_LABELS = {"greedy": "hf-sample"}
PLD_TOKENS = 10


def register_method(name: str, registry: dict = METHODS, samples: bool = False) -> Callable:
    """Decorator adding `fn` to `registry` (METHODS or BATCHED_METHODS) under `name` (later registrations replace
    earlier ones); `samples`: it takes `sampling` (see the module's docstring)."""

    def add(fn):
        registry[name] = fn
        if registry is METHODS:  # a method replaced samples only if its replacement does
            (SAMPLING_METHODS.add if samples else SAMPLING_METHODS.discard)(name)
        return fn

    return add


def method_label(name: str, sampling: SamplingParams | None) -> str:
    """The name a method's rows and summary carry: its own, or in a sampling run what it then does."""
    return name if sampling is None else SAMPLING_LABELS.get(name, name)


def seeded(sampling: SamplingParams | None, prompt_index: int) -> SamplingParams | None:
    """The run's sampling parameters for one prompt, seeded with the run's seed + the prompt's index: a prompt
    draws with the same seed in every method, with or without --batch-size. None (greedy) stays None."""
    return None if sampling is None else replace(sampling, seed=sampling.seed + prompt_index)


def sampling_keywords(sampling: SamplingParams | None) -> dict:
    """The keyword arguments of a method call: `sampling` only when the run samples, so that methods that decode
    greedily only need not take it."""
    return {} if sampling is None else {"sampling": sampling}


def one_row(sampling: SamplingParams | None) -> list[SamplingParams] | None:
    """`decode`'s per-prompt sampling argument for a single prompt."""
    return None if sampling is None else [sampling]


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


def hf_generate(model, input_ids, max_new_tokens: int, sampling: SamplingParams | None = None,
                **kwargs) -> tuple[torch.Tensor, int]:
    """`model.generate` with the extra kwargs, greedy; steps counted by the forward hook. With `sampling`, it
    samples with its temperature, top-k, top-p and min-p, drawing from torch's RNG seeded with its seed: the same
    seed gives HF methods the same draws, but not the library's, which are keyed by (seed, position, token)."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    if sampling is not None:
        torch.manual_seed(sampling.seed)
    with count_forwards(model) as counter:
        sequences = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **hf_sampling(sampling),
            **kwargs,
        )
    return sequences, counter.steps


def hf_sampling(sampling: SamplingParams | None) -> dict:
    """`model.generate`'s arguments for `sampling`, every warper given (top_k 0 when off): left out, HF would take
    the model's generation config or its own defaults (top_k 50)."""
    if sampling is None:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "min_p": sampling.min_p or None}  # HF adds a min-p warper for any value but None


@register_method("greedy", samples=True)
def greedy(model, input_ids, max_new_tokens, args, sampling=None):
    return hf_generate(model, input_ids, max_new_tokens, sampling)


@register_method("pld", samples=True)
def prompt_lookup(model, input_ids, max_new_tokens, args, sampling=None):
    return hf_generate(model, input_ids, max_new_tokens, sampling, prompt_lookup_num_tokens=PLD_TOKENS)


def lookahead_config(args) -> LookaheadConfig | str:
    """The configuration of --window/--ngram/--guesses/--candidate-length, or "auto" when none is given."""
    return config_from_args(args) or AUTO


def histogram(stats) -> dict[str, int]:
    return {str(k): v for k, v in sorted(stats.accepted_histogram.items())}


@register_method("hf-compiled", samples=True)
def hf_compiled(model, input_ids, max_new_tokens, args, sampling=None):
    """HF's fastest greedy setting: static cache, which `generate` compiles on GPUs by itself."""
    return hf_generate(model, input_ids, max_new_tokens, sampling, cache_implementation="static")


class TimedRunner:
    """A StepRunner wrapper adding up the seconds spent in the model: the prefill and every fused step (forward,
    verification, KV commit and the host sync that ends it). The rest of a run is host-side work: drafting,
    window, pool, shape choice and stopping checks. Steps pipelined as the runner allows (on CUDA) count the
    launch and the wait for the outcomes; the host work between them is the loop's."""

    def __init__(self, runner) -> None:
        self.runner, self.model_seconds = runner, 0.0

    def __getattr__(self, name):  # what the scheduler asks of a runner, as the runner has it (as StepClock does)
        return getattr(self.runner, name)

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

    def launch_rows(self, shape, steps, histories):
        return self._timed(self.runner.launch_rows, shape, steps, histories)

    def chain(self, launched, changes, shape=None, rows=None):
        return self._timed(self.runner.chain, launched, changes, shape, rows)

    def finish_rows(self, launched):
        return self._timed(self.runner.finish_rows, launched)

    def step_rows(self, shape, steps, histories, overlap=None):
        # The overlapped host work is the loop's, not the model's: its time is taken back out.
        host_seconds = 0.0

        def timed_overlap(device_busy):
            nonlocal host_seconds
            start = time.perf_counter()
            overlap(device_busy)
            host_seconds += time.perf_counter() - start

        outcomes = self._timed(self.runner.step_rows, shape, steps, histories,
                               None if overlap is None else timed_overlap)
        self.model_seconds -= host_seconds
        return outcomes


def lookahead_with(config: LookaheadConfig | str, source=None) -> Method:
    """Decoding with `config` ("auto" included) and `source` (None: the default sources) on the runner the library
    picks (the static engine on CUDA, reused across prompts): greedy, or sampling with `sampling`. Rows also get
    `model_seconds`, the time spent in the model (see TimedRunner), the steps taken of each shape and the plan
    (shapes and their costs)."""

    def run(model, input_ids, max_new_tokens, args, sampling=None):
        samples = sampling is not None
        plan = resolve_plan(model, config, sampling=samples)
        drafts = make_source(source, plan.shapes)  # a fresh source per prompt, as ld.generate makes
        # Sized for the run's --max-new-tokens, so that the short warm-up builds the engine the run uses.
        length = input_ids.shape[1] + max(max_new_tokens, getattr(args, "max_new_tokens", 0))
        engine = runner_for(model, plan.shapes, length, compile=bool(getattr(args, "compile", False)),
                            predictions=drafts.predictions_wanted, sampling=samples)
        plan = compiled_plan(plan, engine, samples)
        runner = TimedRunner(engine)
        (result,), stats, _ = decode(model, input_ids.tolist(), max_new_tokens, plan, source=drafts, runner=runner,
                                     sampling=one_row(sampling), isolated=bool(getattr(args, "isolated", False)))
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


@register_method("ar-graph", samples=True)
def autoregressive_graph(model, input_ids, max_new_tokens, args, sampling=None):
    """Plain one-token-per-step decoding on the same engine as lookahead (CUDA graphs on GPU)."""
    return lookahead_with(*autoregressive_settings(args))(model, input_ids, max_new_tokens, args, sampling)


@register_method("lookahead", samples=True)
def lookahead(model, input_ids, max_new_tokens, args, sampling=None):
    """Our lookahead decoding as `ld.generate` runs it: calibrated shapes chosen per step unless W/N/G are given."""
    return lookahead_with(*lookahead_settings(args))(model, input_ids, max_new_tokens, args, sampling)


@register_method("lookahead-eager", samples=True)
def lookahead_eager(model, input_ids, max_new_tokens, args, sampling=None):
    """Lookahead decoding on the dynamic-cache runner (no static engine, no graphs)."""
    samples = sampling is not None
    plan = resolve_plan(model, lookahead_config(args), sampling=samples)
    drafts = make_source(getattr(args, "source", None), plan.shapes)
    runner = EagerStep(ModelAdapter(model), plan.shapes, predictions=drafts.predictions_wanted, sampling=samples)
    (result,), stats, _ = decode(model, input_ids.tolist(), max_new_tokens, plan, source=drafts, runner=runner,
                                 sampling=one_row(sampling))
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


def check_sampling(names: list[str]) -> None:
    """Sampling runs need methods that sample (registered with samples=True): the others would decode greedily."""
    greedy_only = [name for name in names if name not in SAMPLING_METHODS]
    if greedy_only:
        raise ValueError(f"--temperature: {', '.join(greedy_only)} cannot sample (greedy only); methods that sample: "
                         f"{', '.join(name for name in METHODS if name in SAMPLING_METHODS)}")


def check_batched(names: list[str]) -> None:
    """Batched runs need methods that decode batches on the library's engine (BATCHED_METHODS)."""
    unbatched = [name for name in names if name not in BATCHED_METHODS]
    if unbatched:
        raise ValueError(f"--batch-size: {', '.join(unbatched)} cannot run batched (one prompt at a time); "
                         f"batched methods: {', '.join(BATCHED_METHODS)}")
