"""The decoding loop: one fused forward per step runs the lookahead branch and verifies a token tree of drafts.

    prefill  ->  repeat: sources propose drafts, merged into a tree | choose the step shape |
                         fused forward, verify the tree, commit the accepted path's KV |
                         advance that shape's window | feed the sources | emit tokens
"""

from __future__ import annotations

import random
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import LookaheadConfig
from .drafting import CandidateSource
from .drafting.sources import make_source
from .model_adapter import ModelAdapter
from .runners import auto_plan, runner_for
from .sampling import make_verifier
from .state import Emitter, GenerationStats, SequenceState
from .step import StepRunner
from .tuning import StepPlan, time_steps
from .verification import GreedyVerifier, Verifier

AUTO = "auto"
_runner_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # prebuilt runner -> its measured StepPlan


@dataclass
class LookaheadOutput:
    sequences: torch.LongTensor  # [1, prompt_len + new_tokens]
    stats: GenerationStats
    plan: StepPlan  # the step shapes this generation could use (one, for an explicit configuration)


def _eos_set(model, eos_token_id) -> set[int]:
    """EOS ids from `eos_token_id` (an int, a sequence of ints or an integer tensor), else from the model's
    generation config. Anything else is an error: a string such as "2" would never match a token."""
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    given = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
    ids = given if isinstance(given, (list, tuple, set, frozenset)) else [given]
    # __index__: ints and numpy integers, but not floats, strings or nested lists (bool is excluded by hand).
    if not all(hasattr(i, "__index__") and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_token_id must be an int, a list of ints or an integer tensor, got {eos_token_id!r} "
                        f"({type(eos_token_id).__name__})")
    if any(i < 0 for i in ids):
        raise ValueError(f"eos_token_id must hold token ids >= 0, got {eos_token_id!r}")
    return {i.__index__() for i in ids}


def _check_inputs(adapter: ModelAdapter, input_ids, max_new_tokens) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer torch.Tensor of shape [1, prompt_len]")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, prompt_len], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"lookahead decoding supports batch size 1 only, got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: input_ids has no tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    total = input_ids.shape[1] + max_new_tokens
    if adapter.context_length is not None and total > adapter.context_length:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds the "
            f"model's context length of {adapter.context_length}"
        )
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids holds token ids outside the model's vocabulary [0, {vocab})")


def resolve_plan(model, config, verifier: Verifier | None = None, runner: StepRunner | None = None) -> StepPlan:
    """The step shapes for `config`: "auto" (or None) calibrates them for this device (see tuning.py), a
    LookaheadConfig is the one fixed shape, a StepPlan is used as it is. With a prebuilt `runner`, "auto" means
    the runner's own shapes."""
    if isinstance(config, StepPlan):
        return config
    if isinstance(config, LookaheadConfig):
        return StepPlan((config,), (1.0,))
    if config is not None and config != AUTO:
        raise TypeError(f'config must be a LookaheadConfig, "auto" or None, got {config!r}')
    if runner is None:
        return auto_plan(model, verifier)
    shapes = tuple(layout.config for layout in runner.layouts)
    if len(shapes) == 1:
        return StepPlan(shapes, (1.0,))
    if runner not in _runner_plans:  # measured once per runner
        vocab = runner.adapter.model.get_output_embeddings().weight.shape[0]
        _runner_plans[runner] = StepPlan(shapes, tuple(time_steps(runner, vocab)))
    return _runner_plans[runner]


def check_step_fits(adapter: ModelAdapter, plan: StepPlan, prompt_len: int, max_new_tokens: int) -> None:
    """Reject a step shape that cannot run, before any work: more rows than the model's context has room for
    after the prompt, or (roughly) more memory than the device has free."""
    context = adapter.context_length
    free = available_memory(adapter.device)
    for shape in plan.shapes:
        rows = shape.tokens_per_step
        if context is not None and prompt_len + rows > context:
            raise ValueError(
                f"a lookahead step of W={shape.window}, N={shape.ngram}, G={shape.guesses} has {rows} tokens, more "
                f"than the model's context of {context} leaves after the {prompt_len}-token prompt; lower W, N or G"
            )
        needed = step_memory_bytes(adapter, rows, prompt_len + max_new_tokens + rows)
        if free is not None and needed > free:
            raise ValueError(
                f"a lookahead step of W={shape.window}, N={shape.ngram}, G={shape.guesses} ({rows} tokens) needs "
                f"about {needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on {adapter.device}; "
                "lower W, N or G"
            )


def step_memory_bytes(adapter: ModelAdapter, rows: int, keys: int) -> int:
    """A rough lower bound of one step's transient memory: the logits of every row (float32), the additive mask
    and one layer's attention scores over all keys."""
    config = adapter.model.config.get_text_config(decoder=True)
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    return 4 * rows * (vocab + keys * (1 + heads))


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device`, if known (host memory: what Linux says is available, page cache included)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decode(
    model,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    config: LookaheadConfig | StepPlan | str | None = AUTO,
    streamer=None,
    stopping_criteria=None,
    eos_token_id=None,
    source: CandidateSource | str | Sequence | None = None,
    seed: int = 0,
    stream_prompt: bool = True,
    verifier: Verifier | None = None,
    runner: StepRunner | None = None,
) -> LookaheadOutput:
    """Lookahead decoding; greedy unless `verifier` says otherwise (see `sampling.make_verifier`).

    `config` is resolved by `resolve_plan`. `stream_prompt=False` when the caller already sent the prompt (HF
    generate). `runner` runs the fused steps (default: `runners.runner_for`, which reuses engines).
    """
    adapter = ModelAdapter(model)
    _check_inputs(adapter, input_ids, max_new_tokens)
    if runner is not None and runner.adapter.model is not model:
        raise ValueError(
            f"the step runner was built for another model ({type(runner.adapter.model).__name__} at "
            f"{id(runner.adapter.model):#x}); an engine belongs to the model it was built with"
        )
    plan = resolve_plan(model, config, verifier, runner)
    check_step_fits(adapter, plan, input_ids.shape[1], max_new_tokens)
    source = make_source(source, plan.shapes, None if runner is None else runner.predictions)
    total = input_ids.shape[1] + max_new_tokens
    if runner is None:
        runner = runner_for(model, plan.shapes, total, verifier, predictions=source.predictions_wanted)
    elif runner.predictions < source.predictions_wanted:
        raise ValueError(f"the source wants the model's top {source.predictions_wanted} predictions, but the step "
                         f"runner was built with predictions={runner.predictions}")
    elif tuple(layout.config for layout in runner.layouts) != plan.shapes:
        shapes = ", ".join(map(str, (layout.config for layout in runner.layouts)))
        raise ValueError(f"the step runner was built for {shapes}, not {', '.join(map(str, plan.shapes))}")
    max_length = getattr(runner, "max_length", None)
    if max_length is not None and total > max_length:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens "
                         f"does not fit this engine's max_length {max_length}")
    if streamer is not None and stream_prompt:
        streamer.put(input_ids.cpu())
    device = adapter.device
    prompt = input_ids[0].tolist()
    emitter = Emitter(list(prompt), max_new_tokens, _eos_set(model, eos_token_id), stopping_criteria, streamer, device)
    sequence = SequenceState(prompt, plan, source, emitter, random.Random(seed))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        if not sequence.done:
            sequence.record_prefill(runner.prefill(input_ids[0].to(device), sequence.history))
        while not sequence.done:
            step = sequence.next_step(runner.layouts)
            sequence.record(step, runner.step(step.shape, step.ids, step.tree, sequence.history))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = sequence.finish(time.perf_counter() - start)
    if streamer is not None:
        streamer.end()
    return LookaheadOutput(torch.tensor([sequence.history], dtype=torch.long, device=input_ids.device), stats, plan)


def generate(
    model,
    input_ids: torch.LongTensor,
    max_new_tokens: int = 128,
    config: LookaheadConfig | StepPlan | str | None = AUTO,
    streamer=None,
    stopping_criteria=None,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    logits_processor=None,
    generator: torch.Generator | None = None,
    runner: StepRunner | None = None,
    source=None,
) -> LookaheadOutput:
    """Lookahead decoding with the output distribution of `model.generate`, in fewer forward passes.

    config: "auto" (the default, also None) uses step shapes calibrated for this device, model and dtype (cached
    in the user's cache directory) and picks one before every step, plain one-token steps included; a
    LookaheadConfig runs that one shape on every step.

    do_sample=False (the default) is greedy: the same tokens as `model.generate(do_sample=False)`, with
    `logits_processor` applied before each argmax. do_sample=True samples from the processed logits warped by
    temperature (> 0), top_k (None or 0: off) and top_p (1: off); every committed token has exactly the
    distribution `model.generate(do_sample=True)` gives it. Randomness comes from `generator` (a
    torch.Generator on the model's device), or from torch's global RNG when it is None.

    Greedy decoding runs on the static engine on CUDA (built once per model, shapes and length bucket, and
    reused). runner: an expert override, a prebuilt step runner such as `StaticStep`; it decodes greedily, so
    it cannot be combined with sampling or logits processors.

    source: where the drafts verified each step come from, merged into one token tree: a `CandidateSource`, a
    name ("pool": the Jacobi window's and the text's n-grams; "suffix": the longest suffix match in the prompt
    and output; "recycled": the model's own recent top-k next tokens), or a list of those. Default: all three.
    """
    verifier = make_verifier(model.device, do_sample, temperature, top_k, top_p, logits_processor, generator)
    if runner is not None and (do_sample or logits_processor):
        raise ValueError("runner= decodes greedily: it cannot be combined with do_sample or logits_processor")
    if type(verifier) is GreedyVerifier:
        verifier = None  # plain greedy: the runner's own (the static engine verifies on the device)
    return decode(
        model, input_ids, max_new_tokens, config, streamer, stopping_criteria, eos_token_id, source=source,
        verifier=verifier, runner=runner,
    )
