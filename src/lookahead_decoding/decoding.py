"""Lookahead decoding of one prompt or a batch: one fused forward per step runs the lookahead branch and verifies
a token tree of drafts, for every sequence at once.

    prefill  ->  repeat: sources propose drafts, merged into a tree (per sequence) | choose the step shape |
                         fused forward, verify each tree, commit each accepted path's KV |
                         advance that shape's windows | feed the sources | emit tokens (per sequence)

The loop itself is `scheduler.BatchScheduler`; this module checks the inputs, picks the plan and the runner, and
shapes the result.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList

from .config import LookaheadConfig
from .drafting import CandidateSource, DraftMemory
from .drafting.sources import SOURCE_NAMES, make_source
from .engine import check_batch_size
from .model_adapter import ModelAdapter
from .runners import auto_plan, compiled_plan, runner_for, runner_plan
from .sampling import check_sampling_args, make_verifier, row_sampling
from .sampling_params import SamplingParams
from .scheduler import BatchScheduler, Finished, requests_from
from .state import GenerationStats
from .step import StepRunner
from .tuning import StepPlan, shape_name
from .verification import Verifier

AUTO = "auto"


@dataclass
class RowOutput:
    tokens: list[int]  # the prompt (without padding), then the new tokens
    stats: GenerationStats  # this row's own: its steps, tokens, seconds from admission to its last token


@dataclass
class LookaheadOutput:
    sequences: torch.LongTensor  # [batch, prompt_len + new_tokens], as model.generate returns them
    # One prompt: its own statistics. A batch: the run's; steps are batched forwards, new_tokens all rows' tokens.
    stats: GenerationStats
    plan: StepPlan  # the step shapes this generation could use (one, for an explicit configuration)
    rows: list[RowOutput]  # per prompt, in input order


def eos_set(model, eos_token_id=None) -> set[int]:
    """EOS ids from `eos_token_id` (an int, a sequence of ints or an integer tensor), else from the model's
    generation config. Anything else is an error: a string such as "2" would never match a token."""
    given_here = eos_token_id is not None
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
    vocab = ModelAdapter(model).vocab if given_here else None  # the model's own config is not second-guessed
    if vocab is not None and any(i >= vocab for i in ids):
        raise ValueError(f"eos_token_id {eos_token_id!r} is outside the model's vocabulary [0, {vocab}): such a "
                         "token is never generated")
    return {i.__index__() for i in ids}


def batch_input(input_ids, attention_mask=None) -> tuple:
    """(input_ids, attention_mask), taken out of a tokenizer's encoding (a BatchEncoding or any mapping) when
    one is passed whole as `input_ids`."""
    if not isinstance(input_ids, Mapping):
        return input_ids, attention_mask
    if "input_ids" not in input_ids:
        raise ValueError("the encoding passed as input_ids has no 'input_ids'")
    if "attention_mask" not in input_ids:
        return input_ids["input_ids"], attention_mask
    if attention_mask is not None:
        raise ValueError("attention_mask is given twice: inside the encoding passed as input_ids and as an "
                         "argument; pass it once")
    return input_ids["input_ids"], input_ids["attention_mask"]


def _shape(rows: list[list]) -> str:
    """The shape of a batch given as lists, as errors name it."""
    widths = {len(row) for row in rows}
    if len(widths) <= 1:
        return str((len(rows), *widths))
    return f"({len(rows)} rows of lengths {[len(row) for row in rows]})"


def token_rows(input_ids) -> list[list[int]]:
    """`input_ids` as token lists: a [batch, prompt_len] integer tensor or numpy array, or a list of token-id
    lists (any lengths)."""
    if isinstance(input_ids, (torch.Tensor, numpy.ndarray)):
        if isinstance(input_ids, torch.Tensor):
            integer = input_ids.dtype in (torch.int64, torch.int32)
        else:
            integer = numpy.issubdtype(input_ids.dtype, numpy.signedinteger)
        if not integer:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, prompt_len], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no prompt (batch size 0)")
        return input_ids.tolist()
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(row, (list, tuple)) for row in input_ids):
        for index, row in enumerate(input_ids):
            if not all(isinstance(token, int) and not isinstance(token, bool) for token in row):
                raise TypeError(f"prompt {index} must be a list of int token ids")
        return [list(row) for row in input_ids]
    raise TypeError("input_ids must be an integer torch.Tensor or numpy array of shape [batch, prompt_len] or a "
                    f"non-empty list of token-id lists, got {type(input_ids).__name__}")


def prompts_from(input_ids, attention_mask=None) -> list[list[int]]:
    """The prompts of a batch as token lists: `input_ids` as `token_rows` takes it, left-padded where
    `attention_mask` (a tensor, a numpy array or lists, of input_ids' shape) has zeros, as HF tokenizers pad for
    generation."""
    rows = token_rows(input_ids)
    if attention_mask is None:
        return rows
    if isinstance(attention_mask, (torch.Tensor, numpy.ndarray)):
        mask = attention_mask.tolist() if attention_mask.ndim == 2 else None
        given = str(tuple(attention_mask.shape))
    elif isinstance(attention_mask, (list, tuple)) and all(isinstance(line, (list, tuple)) for line in attention_mask):
        mask = [list(line) for line in attention_mask]
        given = _shape(mask)
    else:
        raise TypeError("attention_mask must be a tensor, a numpy array or a list of rows of 0s and 1s, got "
                        f"{type(attention_mask).__name__}")
    if mask is None or [len(line) for line in mask] != [len(row) for row in rows]:
        raise ValueError(f"attention_mask must have input_ids' shape {_shape(rows)}, got {given}")
    for index, line in enumerate(mask):
        if any(value not in (0, 1) for value in line):
            raise ValueError(f"attention_mask must hold 0s and 1s only (row {index} does not)")
        if any(left > right for left, right in zip(line, line[1:])):
            raise ValueError(f"row {index} of attention_mask is not left-padded (zeros after ones); lookahead "
                             "decoding takes left-padded batches: set tokenizer.padding_side = 'left'")
    return [[token for token, keep in zip(row, line) if keep] for row, line in zip(rows, mask)]


def new_token_limits(max_new_tokens, count: int) -> list[int]:
    """One max_new_tokens per prompt: an int for every prompt, or a list of one per prompt."""
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * count
    if len(limits) != count:
        raise ValueError(f"max_new_tokens has {len(limits)} values for {count} prompts; give one per prompt or one int")
    for limit in limits:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {limit!r}")
    return limits


def context_overflow(context: int | None, prompt_tokens: int, max_new_tokens: int) -> str | None:
    """Why a prompt of `prompt_tokens` tokens and `max_new_tokens` new ones do not fit a model's `context` (said
    after the prompt's name), or None where they do."""
    total = prompt_tokens + max_new_tokens
    if context is None or total <= context:
        return None
    return (f"({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds the model's "
            f"context length of {context}")


def _check_inputs(adapter: ModelAdapter, prompts: list[list[int]], limits: list[int]) -> None:
    vocab = adapter.vocab
    for index, (prompt, limit) in enumerate(zip(prompts, limits)):
        name = "prompt" if len(prompts) == 1 else f"prompt {index}"
        if not prompt:
            raise ValueError("the prompt is empty: input_ids has no tokens" if len(prompts) == 1 else
                             f"prompt {index} is empty: it has no tokens")
        overflow = context_overflow(adapter.context_length, len(prompt), limit)
        if overflow is not None:
            raise ValueError(f"{name} {overflow}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"{name} holds token ids outside the model's vocabulary [0, {vocab})")


def criteria_of(stopping_criteria):
    """HF stopping criteria as the rows check them: one callable (a `StoppingCriteriaList` or a criterion), a list
    of them (as `model.generate` takes), or None."""
    if stopping_criteria is None or callable(stopping_criteria):
        return stopping_criteria
    if isinstance(stopping_criteria, (list, tuple)) and all(callable(c) for c in stopping_criteria):
        return StoppingCriteriaList(stopping_criteria)
    raise TypeError(f"stopping_criteria must be a StoppingCriteria (or any callable of input_ids and scores) or a "
                    f"list of them, got {stopping_criteria!r}")


def resolve_plan(model, config, verifier: Verifier | None = None, runner: StepRunner | None = None,
                 batch_size: int = 1, sampling: bool = False) -> StepPlan:
    """The step shapes for `config`: "auto" (or None) calibrates them for this device and batch size (see
    tuning.py), a LookaheadConfig is the one fixed shape, a StepPlan is used as it is. With a prebuilt `runner`,
    "auto" means the runner's own shapes, timed on it (`runners.runner_plan`)."""
    if isinstance(config, StepPlan):
        return config
    if isinstance(config, LookaheadConfig):
        return StepPlan((config,), (1.0,))
    if config is not None and config != AUTO:
        raise TypeError(f'config must be a LookaheadConfig, a StepPlan, "auto" or None, got {config!r}')
    if runner is None:
        return auto_plan(model, verifier, batch_size, sampling)
    return runner_plan(runner, sampling)


def step_misfit(adapter: ModelAdapter, shape: LookaheadConfig, prompt_len: int, max_new_tokens: int,
                batch_size: int, free: int | None) -> str | None:
    """Why a step of `shape` cannot run for this generation, said after the step's name, or None if it can: more
    rows than the model's context has room for after the (longest) prompt, or (roughly) more memory than the
    `free` bytes for `batch_size` sequences."""
    rows = shape.tokens_per_step
    context = adapter.context_length
    if context is not None and prompt_len + rows > context:
        return (f"has {rows} tokens, more than the model's context of {context} leaves after the {prompt_len}-token "
                "prompt")
    needed = batch_size * step_memory_bytes(adapter, rows, prompt_len + max_new_tokens + rows)
    if free is not None and needed > free:
        return (f"({rows} tokens{f' for each of {batch_size} sequences' if batch_size > 1 else ''}) needs about "
                f"{needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on {adapter.device}")
    return None


def check_step_fits(adapter: ModelAdapter, plan: StepPlan, prompt_len: int, max_new_tokens: int,
                    batch_size: int = 1) -> None:
    """Reject a step shape the user chose that cannot run (see `step_misfit`), before any work."""
    free = available_memory(adapter.device)
    for shape in plan.shapes:
        misfit = step_misfit(adapter, shape, prompt_len, max_new_tokens, batch_size, free)
        if misfit is not None:
            raise ValueError(f"a lookahead step of W={shape.window}, N={shape.ngram}, G={shape.guesses}, "
                             f"B={shape.tree_nodes} {misfit}; its rows are (N-1)·W + B: lower W, N or tree_nodes "
                             "(B, by default G·K)")


def fitting_plan(adapter: ModelAdapter, plan: StepPlan, prompt_len: int, max_new_tokens: int,
                 batch_size: int = 1) -> StepPlan:
    """The calibrated `plan` restricted to the shapes that can run for this generation (see `step_misfit`), costs
    kept: near the context, or short of memory, "auto" takes smaller steps, down to plain ones."""
    free = available_memory(adapter.device)
    misfits = [step_misfit(adapter, shape, prompt_len, max_new_tokens, batch_size, free) for shape in plan.shapes]
    kept = [index for index, misfit in enumerate(misfits) if misfit is None]
    if not kept:
        smallest = min(range(len(plan.shapes)), key=lambda index: plan.shapes[index].tokens_per_step)
        raise ValueError(f"no step of the calibrated plan fits: its smallest, {shape_name(plan.shapes[smallest])}, "
                         f"{misfits[smallest]}")
    return plan.keeping(kept)


def step_memory_bytes(adapter: ModelAdapter, rows: int, keys: int) -> int:
    """A rough lower bound of one step's transient memory: the logits of every row (float32), the additive mask
    and one layer's attention scores over all keys."""
    config = adapter.model.config.get_text_config(decoder=True)
    vocab = adapter.vocab
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


def make_sources(source, shapes, predictions: int | None, count: int) -> Callable[..., CandidateSource]:
    """A factory of one draft source per sequence from `ld.generate`'s `source` (see `make_source`), called with
    the DraftMemory the sequence drafts from, if any; a source object holds one sequence's state, so a batch needs
    names (or None)."""
    given = [source] if isinstance(source, CandidateSource) else source if isinstance(source, (list, tuple)) else []
    if count > 1 and any(isinstance(part, CandidateSource) for part in given):
        raise ValueError(f"a CandidateSource object drafts for one sequence; for a batch of {count} prompts pass "
                         f"source names ({', '.join(SOURCE_NAMES)}) or None")
    return lambda memory=None: make_source(source, shapes, predictions, memory)


def check_memory(memory, model) -> None:
    """Tie `memory` (a DraftMemory, or None for none) to `model` before any work: one that holds another model's
    text is refused (ValueError), and so is anything else (TypeError)."""
    if memory is None:
        return
    if not isinstance(memory, DraftMemory):
        raise TypeError(f"memory must be a DraftMemory or None, got {type(memory).__name__}")
    memory.bind(model)


def schedule(
    model,
    prompts: list[list[int]],
    max_new_tokens: int | Sequence[int],
    config: LookaheadConfig | StepPlan | str | None = AUTO,
    streamer=None,
    stopping_criteria=None,
    eos_token_id=None,
    source: CandidateSource | str | Sequence | None = None,
    window_seed: int = 0,
    stream_prompt: bool = True,
    verifier: Verifier | None = None,
    runner: StepRunner | None = None,
    batch_size: int | None = None,
    sampling: Sequence[SamplingParams | None] | None = None,
    memory: DraftMemory | None = None,
    isolated: bool = False,
) -> BatchScheduler:
    """Check everything, pick the plan and the runner, and queue `prompts` (token lists; tagged by their index)
    for lookahead decoding `batch_size` at a time (default: all at once), each up to its `max_new_tokens` (one
    int for all, or one per prompt); greedy unless `sampling` gives prompts their `SamplingParams` (one per prompt,
    None: greedy) or a `verifier` decides under logits processors (see `sampling.make_verifier`), drafting from
    `memory` too when given (and adding every result to it), or each prompt apart from every other request when
    `isolated`. `scheduler.run()` then yields each result as it finishes.

    `config` is resolved by `resolve_plan`; "auto" keeps only the shapes that fit these prompts (`fitting_plan`),
    while the user's own shapes that do not fit are refused. `stream_prompt=False` when the caller already sent
    the prompt (HF generate). `runner` runs the fused steps (default: `runners.runner_for`, which reuses engines);
    its rows set the batch size.
    """
    adapter = ModelAdapter(model)
    limits = new_token_limits(max_new_tokens, len(prompts))
    _check_inputs(adapter, prompts, limits)
    check_memory(memory, model)
    if not isinstance(isolated, bool):
        raise TypeError(f"isolated must be True or False, got {isolated!r}")
    if isolated and memory is not None:
        raise ValueError("isolated=True decodes apart from every other request, so it takes no memory: pass "
                         "memory=None, or isolated=False to draft from the memory")
    stopping_criteria = criteria_of(stopping_criteria)
    if streamer is not None and len(prompts) > 1:
        raise ValueError(f"a streamer follows one sequence; got a batch of {len(prompts)} prompts")
    if runner is not None and not all(hasattr(runner, name) for name in ("adapter", "layouts", "batch_size")):
        raise TypeError(f"runner must be a step runner such as lookahead_decoding.StaticStep, got {runner!r}")
    if runner is not None and runner.adapter.model is not model:
        raise ValueError(
            f"the step runner was built for another model ({type(runner.adapter.model).__name__} at "
            f"{id(runner.adapter.model):#x}); an engine belongs to the model it was built with"
        )
    if batch_size is not None:
        check_batch_size(batch_size)
    batch = runner.batch_size if runner is not None else min(batch_size or len(prompts), len(prompts))
    samples = any(params is not None for params in sampling or ())
    if sampling is not None and len(sampling) != len(prompts):
        raise ValueError(f"sampling has {len(sampling)} entries for {len(prompts)} prompts; give one per prompt")
    plan = resolve_plan(model, config, verifier, runner, batch, samples)
    longest = max(len(prompt) for prompt in prompts)
    if runner is None and (config is None or config == AUTO):
        plan = fitting_plan(adapter, plan, longest, max(limits), batch)
    else:  # the user's own shapes (a config, a plan, a runner's) are refused, never changed
        check_step_fits(adapter, plan, longest, max(limits), batch)
    make_row_source = make_sources(source, plan.shapes, None if runner is None else runner.predictions, len(prompts))
    wanted = make_row_source().predictions_wanted  # also rejects a bad `source` now, not at the first admission
    # The engine holds the longest sequence any prompt may become.
    total, widest = max((len(prompt) + limit, index) for index, (prompt, limit) in enumerate(zip(prompts, limits)))
    if runner is None:
        runner = runner_for(model, plan.shapes, total, verifier, predictions=wanted, batch_size=batch,
                            sampling=samples)
    elif runner.predictions < wanted:
        raise ValueError(f"the source wants the model's top {wanted} predictions, but the step runner was built "
                         f"with predictions={runner.predictions}")
    elif tuple(layout.config for layout in runner.layouts) != plan.shapes:
        shapes = ", ".join(map(str, (layout.config for layout in runner.layouts)))
        raise ValueError(f"the step runner was built for {shapes}, not {', '.join(map(str, plan.shapes))}")
    max_length = getattr(runner, "max_length", None)
    if max_length is not None and total > max_length:
        raise ValueError(f"prompt ({len(prompts[widest])} tokens) + max_new_tokens ({limits[widest]}) = {total} tokens "
                         f"does not fit this engine's max_length {max_length}")
    if streamer is not None and stream_prompt:
        streamer.put(torch.tensor(prompts))
    scheduler = BatchScheduler(runner, plan, make_row_source, memory)
    for request in requests_from(prompts, limits, eos_set(model, eos_token_id), stopping_criteria, window_seed,
                                 streamer, sampling, isolated):
        scheduler.submit(request)
    return scheduler


def open_scheduler(model, batch_size: int, max_length: int, config=AUTO, source=None,
                   memory: DraftMemory | None = None, compile: bool = False) -> BatchScheduler:
    """A scheduler for requests that arrive over time (a server's): `batch_size` rows of an engine for sequences of
    up to `max_length` tokens (prompt + new), which samples with each request's `SamplingParams` (greedy where it
    has none), with the step plan for `config` ("auto": calibrated for this batch size). Submit
    `scheduler.Request`s and call `step()`. With a `memory` (a DraftMemory of this model), requests draft from
    the text of earlier ones and add their own when they finish, except those with `use_memory=False`. `compile`:
    the engine's steps are compiled with torch.compile (CUDA only; each step shape compiles when first captured)."""
    check_batch_size(batch_size)
    adapter = ModelAdapter(model)
    check_memory(memory, model)
    if adapter.context_length is not None and max_length > adapter.context_length:
        raise ValueError(f"max_length {max_length} exceeds the model's context length of {adapter.context_length}")
    if compile and adapter.device.type != "cuda":
        raise ValueError(f"compile needs a CUDA device (it compiles the engine's captured steps); the model is on "
                         f"{adapter.device}")
    plan = resolve_plan(model, config, None, None, batch_size, sampling=True)
    make_row_source = make_sources(source, plan.shapes, None, batch_size)
    wanted = make_row_source().predictions_wanted
    runner = runner_for(model, plan.shapes, max_length, compile=compile, predictions=wanted, batch_size=batch_size,
                        sampling=True)
    if config is None or config == AUTO:
        plan = compiled_plan(plan, runner, sampling=True)
    return BatchScheduler(runner, plan, make_row_source, memory)


def decode(model, prompts: list[list[int]], max_new_tokens: int | Sequence[int], *args, **kwargs
           ) -> tuple[list[Finished], GenerationStats, StepPlan]:
    """`schedule` and run to the end: the results in prompt order, the statistics of the run (for one prompt, its
    own) and the plan."""
    scheduler = schedule(model, prompts, max_new_tokens, *args, **kwargs)
    device = scheduler.runner.adapter.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    results = sorted(scheduler.run(), key=lambda finished: finished.tag)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = scheduler.finish(time.perf_counter() - start)
    return results, results[0].stats if len(prompts) == 1 else stats, scheduler.plan


def processors_verifier(device, do_sample, temperature, top_k, top_p, min_p, logits_processor, generator,
                        repetition_penalty, presence_penalty, frequency_penalty, seed) -> Verifier:
    """The host verifier for decoding under the user's logits processors, with the repetition penalty as HF's
    processor in front of them; an int `seed` seeds the generator that the rows draw from in order."""
    if presence_penalty or frequency_penalty:
        raise ValueError("presence_penalty and frequency_penalty do not combine with logits_processor; apply them "
                         "in a processor of your own, or drop logits_processor")
    SamplingParams(repetition_penalty=repetition_penalty, min_p=min_p)  # checks them
    processors = LogitsProcessorList(logits_processor)
    if repetition_penalty != 1:
        processors.insert(0, RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if seed is not None and do_sample:
        if generator is not None or isinstance(seed, (list, tuple)):
            raise ValueError("with logits_processor, the rows draw in order from one generator: give one int seed "
                             "or a generator")
        generator = torch.Generator(device=device).manual_seed(SamplingParams(seed=seed).seed)
    return make_verifier(device, do_sample, temperature, top_k, top_p, processors, generator, min_p)


def pad_token(model) -> int:
    """The id that pads finished rows: the generation config's pad token, else its (first) EOS token, else 0."""
    config = model.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def batch_sequences(input_ids, prompts: list[list[int]], results: list[Finished], pad: int,
                    device) -> torch.LongTensor:
    """The rows as `model.generate` returns them: the input as given when its rows have one length (a tensor, an
    array, padded lists), else the prompts left-padded with `pad` to the longest; then each row's new tokens,
    right-padded with `pad` to the longest."""
    inputs = token_rows(input_ids)
    if len({len(row) for row in inputs}) > 1:
        longest = max(len(prompt) for prompt in prompts)
        inputs = [[pad] * (longest - len(prompt)) + prompt for prompt in prompts]
    new = [result.tokens[len(prompt):] for prompt, result in zip(prompts, results)]
    width = max(len(tokens) for tokens in new)
    rows = [line + tokens + [pad] * (width - len(tokens)) for line, tokens in zip(inputs, new)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def generate(
    model,
    input_ids,
    max_new_tokens: int | Sequence[int] = 128,
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
    attention_mask=None,
    batch_size: int | None = None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | Sequence[int] | None = None,
    memory: DraftMemory | None = None,
    isolated: bool = False,
) -> LookaheadOutput:
    """Lookahead decoding with the output distribution of `model.generate`, in fewer forward passes.

    input_ids: one prompt or a batch, as a [batch, prompt_len] integer tensor or numpy array, or a list of
    token-id lists; left-padded where `attention_mask` (a tensor, an array or lists) has zeros, as a HF tokenizer
    pads with padding_side="left". A tokenizer's whole encoding (`tokenizer(texts, padding=True)`) also does.
    Every row decodes on its own: it accepts its own number of tokens per step and stops on its own (EOS,
    stopping criteria, max_new_tokens: one int, or a list of one per prompt). `batch_size` rows decode side by
    side (default: all prompts); when it is smaller, a row that finishes takes the next prompt. The result has
    every row's tokens and statistics.

    config: "auto" (the default, also None) uses step shapes calibrated for this device, model, dtype and batch
    size (cached in the user's cache directory) and picks one before every step, plain one-token steps included;
    near the model's context (or short of memory) it keeps only the shapes that fit. A LookaheadConfig runs that
    one shape on every step, and is refused if it does not fit.

    do_sample=False (the default) is greedy: the same tokens as `model.generate(do_sample=False)`. do_sample=True
    samples from the logits warped by temperature (> 0), top_k (None or 0: off), top_p (1: off) and min_p (0:
    off), in HF's order; every committed token has exactly the distribution `model.generate(do_sample=True)`
    gives it. Penalties apply in both modes: repetition_penalty (1: off) to every token of the prompt and output,
    as HF does; presence_penalty and frequency_penalty (0: off) to the output's tokens, as the OpenAI API does.

    seed: every random draw is keyed by (seed, position, token), so a seed gives the same tokens alone or in any
    batch (in float32; in lower precisions the logits themselves move a little with the batch), and the same
    tokens as plain sampling on the same engine. An int seeds the batch (prompt i uses seed + i); a list gives one
    seed per prompt. Without a seed, each prompt's is drawn from `generator` (a torch.Generator on the model's
    device) or, when that is None too, from torch's global RNG, so seeding either reproduces the run.

    logits_processor: HF `LogitsProcessor` objects, applied before the argmax (greedy) or the warpers
    (sampling), as `model.generate` applies them. They are Python that reads the sequence, so they run on the
    host, one row at a time: slower, but exact. presence_penalty and frequency_penalty do not combine with them.

    Decoding runs on the static engine on CUDA (built once per model, shapes, batch size, length bucket and
    whether it samples, and reused, with every step captured as a CUDA graph); a batch always does (eagerly off
    CUDA). runner: an expert override, a prebuilt step runner such as `StaticStep`; one built with sampling=True
    can sample, but no runner takes logits processors.

    source: where the drafts verified each step come from, merged into one token tree: a `CandidateSource`, a
    name ("pool": the Jacobi window's and the text's n-grams; "suffix": the longest suffix match in the prompt
    and output; "recycled": the model's own recent top-k next tokens), or a list of those. Default: all three.
    A source object drafts for one sequence: a batch takes names.

    memory: a `DraftMemory` to draft from the text of earlier requests too, and to add this call's prompts and
    outputs to (as each finishes, so later rows of a batch draft from earlier ones). It carries the recycled
    source's table across calls. With None (the default) the call's text outlives it nowhere, but a step that
    drafts on the device (`auto` on CUDA) drafts from, and adds to, the engine's own tables of the model's
    predictions, which every call without a memory shares.

    isolated: True decodes apart from every other request: no memory, and a step that drafts on the device
    starts from blank tables whenever a prompt starts on an idle engine (prompts decoding side by side share them
    while they run).
    """
    ModelAdapter(model)  # UnsupportedModelError, naming it, for anything that is not a decoder-only LM
    if model.training:  # dropout would make each forward's predictions random, and greedy output not greedy's
        warnings.warn(f"{type(model).__name__} is in training mode (dropout on): call model.eval() before "
                      "generating", stacklevel=2)
    check_sampling_args(do_sample, temperature, top_k, top_p, logits_processor, generator, model.device)
    input_ids, attention_mask = batch_input(input_ids, attention_mask)
    prompts = prompts_from(input_ids, attention_mask)
    verifier, sampling = None, None
    if logits_processor:
        verifier = processors_verifier(model.device, do_sample, temperature, top_k, top_p, min_p, logits_processor,
                                       generator, repetition_penalty, presence_penalty, frequency_penalty, seed)
    else:
        sampling = row_sampling(len(prompts), do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
                                presence_penalty, frequency_penalty, seed, generator)
    if runner is not None and (logits_processor or (sampling and getattr(runner, "sampler", None) is None)):
        raise ValueError("runner= is a greedy step runner: it cannot sample, apply penalties or run logits "
                         "processors (build a StaticStep with sampling=True to sample)")
    results, stats, plan = decode(
        model, prompts, max_new_tokens, config, streamer, stopping_criteria, eos_token_id, source=source,
        verifier=verifier, runner=runner, batch_size=batch_size, sampling=sampling, memory=memory, isolated=isolated,
    )
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else model.device
    sequences = batch_sequences(input_ids, prompts, results, pad_token(model), device)
    return LookaheadOutput(sequences, stats, plan, [RowOutput(result.tokens, result.stats) for result in results])
