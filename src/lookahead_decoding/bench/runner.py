"""Running the benchmark: every method on every prompt, interleaved prompt by prompt on one loaded model."""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm import tqdm

from ..cli.common import config_dict, encode_prompt, load_from_args, sampling_from_args
from ..config import LookaheadConfig
from ..runners import engine_length
from ..sampling_params import SamplingParams
from ..tuning import shape_name
from .data import Prompt, load_prompts
from .methods import (
    METHODS,
    Method,
    check_sampling,
    lookahead_config,
    lookahead_with,
    method_label,
    parse_methods,
    sampling_keywords,
    seeded,
)

WARMUP_TOKENS = 8
T = TypeVar("T")


@dataclass(frozen=True)
class Encoded:
    prompt: Prompt
    input_ids: torch.Tensor  # [1, prompt_len] on the model's device


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model, args) -> dict:
    """Where and with what the figures were measured."""
    import transformers

    from ..models import default_model_path

    try:
        package_version = importlib.metadata.version("lookahead-decoding")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        package_version = None
    device = model.device
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        # 1, 5 and 15-minute load averages when the run ended: other work on the machine skews wall clock.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "lookahead_decoding": package_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "model": str(args.model) if args.model is not None else str(default_model_path()),
        "model_class": type(model).__name__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_config(args) -> dict:
    """The command line as JSON: every argument except the handler."""
    return {key: value for key, value in vars(args).items() if not callable(value)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stopwatch(device: torch.device, call: Callable[[], T]) -> tuple[T, float]:
    """(result, seconds) of `call()`, timed between device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


def timed(method: Method, model, input_ids, max_new_tokens: int, args, **keywords
          ) -> tuple[torch.Tensor, int, dict, float]:
    """(sequences, steps, extra fields, seconds) of one call, timed between device synchronisations."""
    call = lambda: method(model, input_ids, max_new_tokens, args, **keywords)  # noqa: E731
    (sequences, steps, *extra), seconds = stopwatch(model.device, call)
    return sequences, steps, (extra[0] if extra else {}), seconds


def tokens_per_step(new_tokens: int, steps: int) -> float:
    """New tokens per forward pass after the prefill (a run with no step counts as one)."""
    return new_tokens / max(steps, 1)


def encode_all(tokenizer, prompts: Sequence[Prompt], device) -> list[Encoded]:
    return [Encoded(p, encode_prompt(tokenizer, p.text, p.chat, no_template_message(p)).to(device)) for p in prompts]


def no_template_message(prompt: Prompt) -> str:
    """The error for a chat prompt and a tokenizer without a chat template: the dataset, not an option, asked."""
    return (f"the {prompt.dataset} prompts are chat turns and need a chat template, but this model's tokenizer has "
            "none; use a chat model, or a dataset of plain-text prompts (humaneval)")


def measure(
    model, inputs: Sequence[Encoded], methods: dict[str, Method], max_new_tokens: int, args, extra_fields=None,
    sampling: SamplingParams | None = None,
) -> list[dict]:
    """One row per prompt and method. `methods` must start with the reference (--reference). A warm-up comes first:
    a short run of every method on one prompt per engine size the run needs (see runners.engine_length).
    `extra_fields` maps a method label to fields added to each of its rows. With `sampling`, every method samples,
    each prompt with its own seed (see methods.seeded)."""
    extra_fields = extra_fields or {}
    warmup = min(WARMUP_TOKENS, max_new_tokens)
    per_engine = {engine_length(model, e.input_ids.shape[1] + max_new_tokens): e for e in reversed(inputs)}
    warmups = [(method, encoded) for encoded in per_engine.values() for method in methods.values()]
    for method, encoded in tqdm(warmups, desc="warm-up", file=sys.stderr, leave=False):
        method(model, encoded.input_ids, warmup, args, **sampling_keywords(seeded(sampling, encoded.prompt.index)))
    rows = []
    bar = tqdm(total=len(inputs) * len(methods), desc=inputs[0].prompt.dataset, file=sys.stderr, unit="run")
    with bar:
        for encoded in inputs:
            prompt_len = encoded.input_ids.shape[1]
            prompt_sampling = sampling_keywords(seeded(sampling, encoded.prompt.index))
            reference = None
            for label, method in methods.items():
                bar.set_postfix_str(f"prompt {encoded.prompt.index} {label}")
                sequences, steps, extra, seconds = timed(method, model, encoded.input_ids, max_new_tokens, args,
                                                         **prompt_sampling)
                sequences = sequences.detach().cpu()
                if reference is None:
                    reference = sequences
                new_tokens = sequences.shape[1] - prompt_len
                mismatch = first_mismatch(sequences[0, prompt_len:], reference[0, prompt_len:])
                rows.append({
                    "dataset": encoded.prompt.dataset,
                    "prompt_index": encoded.prompt.index,
                    "method": label,
                    "new_tokens": new_tokens,
                    "seconds": seconds,
                    "steps": steps,
                    "identical_to_greedy": torch.equal(sequences, reference),
                    "tokens_per_step": tokens_per_step(new_tokens, steps),
                    "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
                    "prompt_tokens": prompt_len,
                    "first_mismatch": mismatch,
                    **extra_fields.get(label, {}),
                    **extra,
                })
                bar.update()
    return rows


def first_mismatch(tokens: torch.Tensor, reference: torch.Tensor) -> int | None:
    """Index of the first new token that differs from the reference's (a length difference counts), or None."""
    shared = min(len(tokens), len(reference))
    differs = (tokens[:shared] != reference[:shared]).nonzero()
    if len(differs):
        return int(differs[0])
    return None if len(tokens) == len(reference) else shared


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """{method: totals and ratios} over the rows of one dataset, in the order the methods first appear."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    reference = rows[0]["method"]  # measure() runs the reference first
    greedy_by_prompt = {row["prompt_index"]: row for row in by_method[reference]}
    summary = {}
    for method, method_rows in by_method.items():
        new_tokens = sum(row["new_tokens"] for row in method_rows)
        seconds = sum(row["seconds"] for row in method_rows)
        steps = sum(row["steps"] for row in method_rows)
        speed = new_tokens / seconds if seconds > 0 else 0.0
        # Greedy's speed on exactly the prompts this method ran.
        greedy_rows = [greedy_by_prompt[row["prompt_index"]] for row in method_rows if row["prompt_index"] in greedy_by_prompt]
        greedy_seconds = sum(row["seconds"] for row in greedy_rows)
        greedy_speed = sum(row["new_tokens"] for row in greedy_rows) / greedy_seconds if greedy_seconds > 0 else 0.0
        summary[method] = {
            "n": len(method_rows),
            "new_tokens": new_tokens,
            "seconds": seconds,
            "tokens_per_second": speed,
            "tokens_per_step": tokens_per_step(new_tokens, steps),
            "speedup_vs_greedy": speed / greedy_speed if greedy_speed > 0 else None,
            "identical_to_greedy": sum(row["identical_to_greedy"] for row in method_rows) / len(method_rows),
        }
    return summary


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare(args, model=None, tokenizer=None):
    """(prompts, model, tokenizer): the data is read before the (slow) model load so that input errors come
    first. Pass `model` and `tokenizer` to reuse an already loaded model (the --model/--device/--dtype
    arguments are then only recorded)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _seed(args.seed)
    prompts = load_prompts(args.dataset, args.data_file, args.limit)
    if model is None:
        model, tokenizer = load_from_args(args)
    return prompts, model, tokenizer


def method_names(args) -> list[str]:
    """The methods of --methods, the --reference first (it always runs)."""
    names = parse_methods(args.methods)
    return [args.reference] + [name for name in names if name != args.reference]


def config_record(config: LookaheadConfig | str) -> dict | str:
    """The lookahead configuration for the JSON: its fields, or "auto"."""
    return config if isinstance(config, str) else config_dict(config)


def run_sampling(args, names: Sequence[str] = ()) -> SamplingParams | None:
    """The run's sampling parameters (--temperature, --top-k, --top-p, --min-p, seeded with --seed), or None for
    greedy decoding; checked before the model load, and with them that the methods `names` can sample."""
    sampling = sampling_from_args(args, args.seed)
    if sampling is not None:
        check_sampling(names)
    return sampling


def sampling_record(sampling: SamplingParams | None, reference: str) -> dict | None:
    """The sampling parameters for the JSON, and what the exact-match fields then count; None for greedy runs."""
    if sampling is None:
        return None
    return {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "min_p": sampling.min_p, "seed": sampling.seed, "prompt_seed": "seed + prompt_index",
            "exact_match": f"same tokens as the reference ({reference}) with the same seed"}


def bench(args, model=None, tokenizer=None) -> dict:
    """Run the methods of --methods (the reference always included, first) and return the result document."""
    names = method_names(args)
    config = lookahead_config(args)  # checked before the model load
    sampling = run_sampling(args, names)
    prompts, model, tokenizer = prepare(args, model, tokenizer)
    inputs = encode_all(tokenizer, prompts, model.device)
    methods = {method_label(name, sampling): METHODS[name] for name in names}
    rows = measure(model, inputs, methods, args.max_new_tokens, args, sampling=sampling)
    return {
        "environment": environment(model, args),
        "config": {**run_config(args), "method_list": names, "lookahead_config": config_record(config),
                   "warmup_tokens": WARMUP_TOKENS, "sampling": sampling_record(sampling, next(iter(methods)))},
        "summary": {args.dataset: summarize(rows)},
        "rows": rows,
    }


def sweep_label(config: LookaheadConfig) -> str:
    return shape_name(config)


def sweep_configs(args) -> list[LookaheadConfig]:
    """The grid: --sweep-configs when given, else every (W, N, G) of the three lists (G = W when no list); K and the
    tree's nodes from the entry, else --candidate-length / --tree-nodes, else the defaults."""
    if args.sweep_configs:
        grid = args.sweep_configs
    elif args.sweep_guesses:
        grid = itertools.product(args.sweep_window, args.sweep_ngram, args.sweep_guesses)
    else:
        grid = ((w, n, w) for w, n in itertools.product(args.sweep_window, args.sweep_ngram))
    configs = []
    for window, ngram, guesses, *rest in grid:
        candidate_length = rest[0] if rest else getattr(args, "candidate_length", None)
        tree_nodes = rest[1] if len(rest) > 1 else getattr(args, "tree_nodes", None)
        config = LookaheadConfig(window=window, ngram=ngram, guesses=guesses, candidate_length=candidate_length,
                                 tree_nodes=tree_nodes)
        if config not in configs:
            configs.append(config)
    return configs


def sweep(args, model=None, tokenizer=None) -> dict:
    """The reference once per prompt, then every configuration of the grid on the same prompt."""
    configs = sweep_configs(args)
    sampling = run_sampling(args, [args.reference])
    prompts, model, tokenizer = prepare(args, model, tokenizer)
    inputs = encode_all(tokenizer, prompts, model.device)
    source = getattr(args, "source", None)
    reference = method_label(args.reference, sampling)
    methods = {reference: METHODS[args.reference], **{sweep_label(c): lookahead_with(c, source) for c in configs}}
    fields = {sweep_label(c): config_dict(c) for c in configs}
    rows = measure(model, inputs, methods, args.max_new_tokens, args, extra_fields=fields, sampling=sampling)
    summary = summarize(rows)
    ranking = [{"method": label, **fields[label], **summary[label]} for label in fields]
    ranking.sort(key=lambda entry: (-(entry["speedup_vs_greedy"] or 0.0), -entry["tokens_per_step"]))
    return {
        "environment": environment(model, args),
        "config": {**run_config(args), "grid": [config_dict(c) for c in configs], "warmup_tokens": WARMUP_TOKENS,
                   "sampling": sampling_record(sampling, reference)},
        "summary": {args.dataset: summary},
        "sweep": ranking,
        "rows": rows,
    }
