"""The batched benchmark (`lookahead bench --batch-size B[,B...]`): for every batch size and method, all the prompts
go through one call of B rows, decoded as `ld.generate` decodes them, with continuous batching (a row that finishes
takes the next prompt); with --temperature, every row samples, seeded as in the unbatched benchmark.

Reported per batch size and method: throughput over all rows, speedup over the reference at the same batch size,
the rows' mean tokens per step, the batched forwards (and how many were of each step shape), and how many rows
equal the reference's tokens."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..decoding import decode, resolve_plan
from ..drafting.sources import make_source
from ..runners import compiled_plan, runner_for
from ..sampling_params import SamplingParams
from ..scheduler import Finished
from ..state import GenerationStats
from ..tuning import StepPlan
from .methods import BATCHED_METHODS, check_batched, lookahead_config, seeded
from .runner import (
    WARMUP_TOKENS,
    config_record,
    encode_all,
    environment,
    method_names,
    prepare,
    run_config,
    run_sampling,
    sampling_record,
    stopwatch,
)

WARMUP_PROMPTS = 2

# (count, max_new_tokens) -> `decode`'s (rows, stats, plan) of the first `count` prompts.
Decode = Callable[[int, int], tuple[list[Finished], GenerationStats, StepPlan]]


@dataclass(frozen=True)
class TimedRun:
    """One method's timed call over all the prompts at one batch size."""

    rows: list[Finished]  # in prompt order
    stats: GenerationStats  # of the whole call
    plan: StepPlan
    seconds: float

    @property
    def throughput(self) -> float:
        """New tokens of all rows per wall-clock second."""
        return self.stats.new_tokens / self.seconds if self.seconds > 0 else 0.0


def batch_rows(batch_size: int, prompts: Sequence) -> int:
    """The rows ld.generate decodes side by side: never more than there are prompts."""
    return min(batch_size, len(prompts))


def batched_decode(model, method: str, args, prompts: list[list[int]], batch_size: int,
                   sampling: list[SamplingParams] | None) -> Decode:
    """`decode`, as ld.generate runs it, with `method`'s settings, each prompt's `sampling` (None: greedy) and the
    runner ld.generate would pick for all `prompts` at this batch size, built now for the longest prompt and
    --max-new-tokens: a short warm-up on a few prompts then builds (and on CUDA captures) the very engine the timed
    call runs, where on its own it could pick a smaller length bucket or fewer rows."""
    config, source = BATCHED_METHODS[method](args)
    rows = batch_rows(batch_size, prompts)
    samples = sampling is not None
    # "auto": calibrated for this many rows (once, then cached)
    plan = resolve_plan(model, config, batch_size=rows, sampling=samples)
    predictions = make_source(source, plan.shapes).predictions_wanted
    length = max(len(prompt) for prompt in prompts) + args.max_new_tokens
    runner = runner_for(model, plan.shapes, length, compile=bool(args.compile), predictions=predictions,
                        batch_size=rows, sampling=samples)
    plan = compiled_plan(plan, runner, samples)
    return lambda count, max_new_tokens: decode(model, prompts[:count], max_new_tokens, plan, source=source,
                                                runner=runner, sampling=sampling[:count] if samples else None,
                                                isolated=bool(getattr(args, "isolated", False)))


def timed_run(run: Decode, prompts: int, max_new_tokens: int, device: torch.device) -> TimedRun:
    """An untimed warm-up on a few prompts and tokens (engine build, graph capture), then the timed call of all the
    `prompts`."""
    run(min(WARMUP_PROMPTS, prompts), min(WARMUP_TOKENS, max_new_tokens))
    (rows, stats, plan), seconds = stopwatch(device, lambda: run(prompts, max_new_tokens))
    return TimedRun(rows, stats, plan, seconds)


def same_tokens(run: TimedRun, reference: TimedRun) -> list[bool]:
    """Per prompt: whether the row's tokens equal the reference's."""
    return [row.tokens == base.tokens for row, base in zip(run.rows, reference.rows)]


def batch_record(dataset: str, batch_size: int, method: str, run: TimedRun, reference: tuple[str, TimedRun],
                 prompt_indices: list[int]) -> dict:
    """The figures of one method at one batch size."""
    reference_name, reference_run = reference
    stats, rows = run.stats, run.rows
    identical = same_tokens(run, reference_run)
    return {
        "dataset": dataset,
        "batch_size": batch_size,
        "batch_rows": batch_rows(batch_size, rows),
        "method": method,
        "reference": reference_name,
        "prompts": len(rows),
        "new_tokens": stats.new_tokens,
        "seconds": run.seconds,
        "throughput_tokens_per_s": run.throughput,
        "speedup": run.throughput / reference_run.throughput if reference_run.throughput > 0 else None,
        "tokens_per_step_per_row": statistics.fmean(row.stats.tokens_per_step for row in rows),
        "forwards": stats.steps,
        "steps_by_shape": dict(stats.shape_steps),
        "prefills": stats.prefills,
        "carried_prompts": stats.carried_prompts,
        "identical": sum(identical),
        "different_prompts": [index for index, same in zip(prompt_indices, identical) if not same],
        "plan": run.plan.describe(),
    }


def prompt_rows(dataset: str, batch_size: int, method: str, run: TimedRun, reference: TimedRun,
                prompt_indices: list[int]) -> list[dict]:
    """One line per prompt: its own new tokens, the forwards it took part in, and whether it equals the reference."""
    return [{
        "dataset": dataset,
        "batch_size": batch_size,
        "method": method,
        "prompt_index": index,
        "new_tokens": row.stats.new_tokens,
        "steps": row.stats.steps,
        "tokens_per_step": row.stats.tokens_per_step,
        "identical_to_reference": same,
    } for index, row, same in zip(prompt_indices, run.rows, same_tokens(run, reference))]


def bench_batched(args, model=None, tokenizer=None) -> dict:
    """Every method of --methods (the reference first) at every batch size of --batch-size, on all the prompts."""
    names = method_names(args)
    check_batched(names)  # every batched method samples
    config = lookahead_config(args)  # checked before the model load
    sampling = run_sampling(args)
    prompts, model, tokenizer = prepare(args, model, tokenizer)
    inputs = encode_all(tokenizer, prompts, model.device)
    token_lists = [encoded.input_ids[0].tolist() for encoded in inputs]
    indices = [encoded.prompt.index for encoded in inputs]
    prompt_sampling = None if sampling is None else [seeded(sampling, index) for index in indices]
    records, rows = [], []
    bar = tqdm(total=len(args.batch_size) * len(names), desc=f"{args.dataset} batched", file=sys.stderr, unit="run")
    with bar:
        for batch_size in args.batch_size:
            reference = None
            for name in names:
                bar.set_postfix_str(f"batch {batch_size} {name}")
                run = timed_run(batched_decode(model, name, args, token_lists, batch_size, prompt_sampling),
                                len(token_lists), args.max_new_tokens, model.device)
                reference = reference or (name, run)
                records.append(batch_record(args.dataset, batch_size, name, run, reference, indices))
                rows += prompt_rows(args.dataset, batch_size, name, run, reference[1], indices)
                bar.update()
    return {
        "environment": environment(model, args),
        "config": {**run_config(args), "method_list": names, "lookahead_config": config_record(config),
                   "warmup_tokens": WARMUP_TOKENS, "warmup_prompts": WARMUP_PROMPTS,
                   "sampling": sampling_record(sampling, names[0])},
        "batched": records,
        "rows": rows,
    }
