"""`lookahead generate`: lookahead decoding of one prompt, streamed, with statistics (and --compare: plain greedy
model.generate on the same prompt, timed the same way); or, with --prompts-file, of every prompt of a JSON Lines
file, --batch-size at a time, each result appended to --out as it finishes. Greedy, or sampling with --temperature.
torch and transformers are imported when it runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .common import (
    PENALTY_OPTIONS,
    WARPER_OPTIONS,
    CommandError,
    add_lookahead_arguments,
    add_model_arguments,
    add_sampling_arguments,
    check_prompt,
    config_dict,
    config_from_args,
    encode_prompt,
    load_from_args,
    non_negative_int,
    positive_int,
    sampling_from_args,
)
from ..jsonl import JsonLinesError
from .prompts_file import PromptLine, pending_prompts, read_prompts
from .results_file import ResultsFile, open_results

WARMUP_TOKENS = 8
HISTOGRAM_WIDTH = 40
DECODE_KWARGS = {"skip_special_tokens": True}  # the text without BOS/EOS markers
SINGLE_PROMPT_OPTIONS = ("compare", "json")  # what --prompts-file does not do
# What a single prompt does not do, and why.
BULK_OPTIONS = {"out": "a single prompt's result is printed", "batch_size": "a single prompt is decoded alone",
                "draft_memory": "a single prompt has no earlier prompts to draft from"}
DEFAULT_DRAFT_MEMORY = 256  # prompts (with their outputs) that --prompts-file drafts from


def add_generate_command(commands) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate text with lookahead decoding, streamed as it is produced",
        description="Generate with lookahead decoding, greedily or (--temperature) sampling, and print statistics; "
        "--compare also times plain greedy model.generate on the same prompt and checks that both outputs are "
        "identical. A seed (--seed) gives the same sampled text whatever the lookahead options. "
        "--prompts-file FILE.jsonl --out RESULTS.jsonl instead generates for every prompt of a file, --batch-size "
        "prompts side by side, and can resume an interrupted run.",
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("prompt", nargs="?", help="the prompt text")
    prompts.add_argument(
        "--prompts-file",
        metavar="FILE.jsonl",
        help='instead of a prompt: JSON Lines, one object a line, {"prompt": "...", "id": ..., "max_new_tokens": '
        '...}; "id" (a string or an integer) defaults to a hash of the prompt, its max_new_tokens and --chat, '
        '"max_new_tokens" to --max-new-tokens; blank lines are skipped; the file may be gzip\'d. The prompts run '
        "--batch-size at a time through the library's scheduler; --chat and the lookahead options apply to each. "
        "The whole file is checked before the model is loaded. Needs --out",
    )
    parser.add_argument(
        "--out",
        metavar="RESULTS.jsonl",
        help='with --prompts-file: appends one JSON line per prompt as it finishes, {"id", "prompt", "text", '
        '"new_tokens", "tokens_per_step", "seconds", "input_hash"}; prompts whose id the file already holds are '
        "skipped, so running the same command again resumes an interrupted run (a line whose id has a result of "
        "another prompt, max_new_tokens or --chat is refused). A regular file, locked while a run writes to it",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="B",
        help="with --prompts-file: decode B prompts side by side (continuous batching: a prompt that finishes "
        "hands its row to the next one), so results may be written out of input order; default: 1",
    )
    parser.add_argument(
        "--draft-memory",
        type=non_negative_int,
        metavar="N",
        help="with --prompts-file: also draft from the last N prompts of this run and their outputs (a draft "
        "memory: text seen in earlier prompts is proposed again, and verified like any draft, so the output is the "
        f"same); 0 turns it off and decodes each prompt apart from the others; default: {DEFAULT_DRAFT_MEMORY}",
    )
    add_model_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N", help="default: 128")
    add_lookahead_arguments(parser)
    add_sampling_arguments(parser, penalties=True)
    parser.add_argument("--seed", type=int,
                        help="with --temperature: the seed of the draws, >= 0; with --prompts-file, the prompt at "
                        "position i of the file takes SEED + i (default: drawn from torch's RNG)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run plain greedy model.generate, timed the same way, and check the outputs are identical "
        "(greedy decoding only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streamed text")
    parser.set_defaults(func=run_generate)


def _silent_streamer(tokenizer, **decode_kwargs):
    """A TextStreamer that decodes every token but prints nothing: gives a timed run the same streaming cost.
    Defined on demand because subclassing needs transformers, which `--help` must not import."""
    from transformers import TextStreamer

    class SilentStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pass

    return SilentStreamer(tokenizer, skip_prompt=True, **decode_kwargs)


def _timed(call, device):
    """(result, wall seconds) of call(), with queued GPU work finished on both ends."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    start = time.perf_counter()
    result = call()
    sync(device)
    return result, time.perf_counter() - start


def _speed(new_tokens: int, seconds: float) -> dict:
    return {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
    }


def _lookahead_runner(args: argparse.Namespace, config, sampling):
    """lookahead(model, input_ids, max_new_tokens, streamer=None): the library's generate with the command's
    step shapes, draft sources and sampling parameters."""
    from ..decoding import generate

    def lookahead(model, input_ids, max_new_tokens: int, streamer=None):
        return generate(model, input_ids, max_new_tokens=max_new_tokens, config=config, streamer=streamer,
                        source=args.source, **_generate_arguments(sampling))

    return lookahead


def _generate_arguments(sampling) -> dict:
    """ld.generate's keyword arguments that decode with the SamplingParams `sampling`: none for plain greedy
    decoding, the penalties alone for greedy decoding with penalties."""
    if sampling is None:
        return {}
    arguments = {name: getattr(sampling, name) for name in PENALTY_OPTIONS}
    if sampling.samples:
        arguments.update({name: getattr(sampling, name) for name in ("temperature", *WARPER_OPTIONS, "seed")},
                         do_sample=True)
    return arguments


def _with_drawn_seed(sampling, seed: int | None):
    """`sampling` with a seed drawn from torch's RNG (as ld.generate draws one) when it samples and --seed was not
    given, so that the output can say which seed ran."""
    if sampling is None or not sampling.samples or seed is not None:
        return sampling
    from ..sampling import row_seeds

    return dataclasses.replace(sampling, seed=row_seeds(1, None, None)[0])


def _new_text(tokenizer, new_tokens: list[int]) -> str:
    return tokenizer.decode(new_tokens, **DECODE_KWARGS)


def run_generate(args: argparse.Namespace) -> int:
    if args.prompts_file is not None:
        return run_prompts_file(args)
    for option, reason in BULK_OPTIONS.items():
        if getattr(args, option) is not None:
            raise CommandError(f"--{option.replace('_', '-')} goes with --prompts-file; {reason}")
    # Input is checked before the (slow) imports and model load so that bad input fails at once.
    check_prompt(args.prompt, "the prompt")
    config = config_from_args(args)  # None: the library's choice
    sampling = sampling_from_args(args, args.seed)
    if args.compare and sampling is not None:
        raise CommandError("--compare checks the output against greedy model.generate: it cannot be combined with "
                           "--temperature or a penalty")

    import torch
    from transformers import TextStreamer

    from ..decoding import context_overflow
    from ..model_adapter import context_length
    from ..models import default_model_path
    from ..tuning import shape_name

    sampling = _with_drawn_seed(sampling, args.seed)
    lookahead = _lookahead_runner(args, config, sampling)
    model, tokenizer = load_from_args(args)
    input_ids = encode_prompt(tokenizer, args.prompt, args.chat).to(model.device)
    prompt_len = input_ids.shape[1]
    stream = not args.json

    def greedy(max_new_tokens: int, streamer=None):
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
        )

    overflow = context_overflow(context_length(model.config), prompt_len, args.max_new_tokens)
    if overflow is not None:  # before the warm-up, which would calibrate first
        raise CommandError(f"prompt {overflow}")
    if args.compare:
        # One-off costs (allocator, kernel selection, lazy init) land on the first calls: pay them for both.
        warmup = min(WARMUP_TOKENS, args.max_new_tokens)
        lookahead(model, input_ids, warmup)
        greedy(warmup)

    streamer = TextStreamer(tokenizer, skip_prompt=True, **DECODE_KWARGS) if stream else None
    out, lookahead_seconds = _timed(lambda: lookahead(model, input_ids, args.max_new_tokens, streamer), model.device)
    result = {
        "prompt": args.prompt,
        "chat": args.chat,
        "prompt_tokens": prompt_len,
        "model": args.model or str(default_model_path()),
        "config": "auto" if config is None else config_dict(config),
        "source": list(args.source) if args.source else "default",
        "sampling": None if sampling is None else dataclasses.asdict(sampling),
        # The step shapes the run could use (costs in ms per step as calibrated); stats.shape_steps says how often.
        "shapes": [{"shape": shape_name(shape), **config_dict(shape), "cost_ms": cost}
                   for shape, cost in zip(out.plan.shapes, out.plan.costs_ms)],
        "max_new_tokens": args.max_new_tokens,
        "text": _new_text(tokenizer, out.sequences[0, prompt_len:].tolist()),
        "stats": out.stats.as_dict(),
    }
    if args.compare:
        # Same treatment as the lookahead run: wall time around the whole call, and a streamer that decodes
        # every token (without printing) when the lookahead run streamed.
        silent = _silent_streamer(tokenizer, **DECODE_KWARGS) if stream else None
        greedy_ids, greedy_seconds = _timed(lambda: greedy(args.max_new_tokens, silent), model.device)
        lookahead_speed = _speed(out.stats.new_tokens, lookahead_seconds)
        greedy_speed = _speed(greedy_ids.shape[1] - prompt_len, greedy_seconds)
        result["lookahead"] = lookahead_speed
        result["greedy"] = greedy_speed
        greedy_tps = greedy_speed["tokens_per_second"]
        result["speedup"] = lookahead_speed["tokens_per_second"] / greedy_tps if greedy_tps > 0 else None
        result["identical"] = torch.equal(out.sequences.cpu(), greedy_ids.cpu())

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return 0


def run_prompts_file(args: argparse.Namespace) -> int:
    """Every prompt of --prompts-file not yet in --out, --batch-size at a time, each result appended as it
    finishes, so that an interrupted run loses at most the prompts it was on."""
    # Everything that can be checked without the model is checked first: a run can take hours.
    if args.out is None:
        raise CommandError("--prompts-file needs --out RESULTS.jsonl, the file the results are written to")
    for option in SINGLE_PROMPT_OPTIONS:
        if getattr(args, option):
            raise CommandError(f"--{option} works on a single prompt, not with --prompts-file")
    config = config_from_args(args)
    sampling = sampling_from_args(args, args.seed)
    # The sampling options decide the text; a seed only when given (a drawn one is as good as any other).
    decisive = None if sampling is None else {**dataclasses.asdict(sampling), "seed": args.seed}
    prompts = read_prompts(args.prompts_file, args.max_new_tokens, args.chat, decisive)
    if Path(args.out).exists() and os.path.samefile(args.prompts_file, args.out):
        raise CommandError("--out is the --prompts-file itself; choose another file for the results")
    with open_results(args.out) as results:  # locked from here on
        pending = pending_prompts(args.prompts_file, prompts, args.out, results.written)
        if pending:
            _run_pending(args, config, sampling, prompts, pending, results)
        else:
            print(f"lookahead: all {len(prompts)} prompts of {args.prompts_file} are in {args.out} already",
                  file=sys.stderr)
    return 0


def _run_pending(args: argparse.Namespace, config, sampling, prompts: list[PromptLine], pending: list[PromptLine],
                 results: ResultsFile) -> None:
    """Decodes the pending prompts of the file's `prompts`, appending each result to --out as it finishes (with its
    seed when it samples)."""
    from tqdm import tqdm

    model, tokenizer = load_from_args(args)
    token_ids = _encode_pending(args, model, tokenizer, pending)
    row_sampling = _pending_sampling(_with_drawn_seed(sampling, args.seed), prompts, pending)
    scheduler = _schedule_pending(args, model, config, pending, token_ids, row_sampling)
    if results.has_cut_line:
        print(f"lookahead: {args.out}: its last line was cut short by an interrupted write; that prompt runs again",
              file=sys.stderr)
        results.drop_cut_line()
    total = len(prompts)
    with tqdm(total=total, initial=total - len(pending), desc=Path(args.prompts_file).name, unit="prompt",
              file=sys.stderr) as progress:
        for finished in scheduler.run():
            entry, prompt_len = pending[finished.tag], len(token_ids[finished.tag])
            stats = finished.stats
            # The id says which prompt this is: with a batch, results come in the order they finish.
            seed = {"seed": row_sampling[finished.tag].seed} if sampling is not None and sampling.samples else {}
            results.append({"id": entry.id, "prompt": entry.prompt,  # the id first: results_file.LINE_START
                            "text": _new_text(tokenizer, finished.tokens[prompt_len:]),
                            "new_tokens": stats.new_tokens, "tokens_per_step": stats.tokens_per_step,
                            "seconds": stats.seconds, "input_hash": entry.input_hash, **seed})
            progress.update()


def _encode_pending(args: argparse.Namespace, model, tokenizer, pending: list[PromptLine]) -> list[list[int]]:
    """The token ids of every pending prompt, each checked against the model's context before any decoding: a
    prompt that cannot run must not stop a long run halfway, and the error names its line."""
    from ..decoding import context_overflow
    from ..model_adapter import context_length

    context = context_length(model.config)
    token_ids = []
    for entry in pending:
        ids = encode_prompt(tokenizer, entry.prompt, args.chat)[0].tolist()
        overflow = context_overflow(context, len(ids), entry.max_new_tokens)
        if overflow is not None:
            raise JsonLinesError(args.prompts_file, entry.line, f"prompt {overflow}")
        token_ids.append(ids)
    return token_ids


def _pending_sampling(sampling, prompts: list[PromptLine], pending: list[PromptLine]):
    """Each pending prompt's SamplingParams: `sampling` seeded with its seed + the prompt's position in the file,
    so that a resumed run gives a prompt the seed an uninterrupted one would have (None: plain greedy)."""
    if sampling is None:
        return None
    position = {entry.id: index for index, entry in enumerate(prompts)}
    return [dataclasses.replace(sampling, seed=sampling.seed + position[entry.id]) for entry in pending]


def _schedule_pending(args: argparse.Namespace, model, config, pending: list[PromptLine],
                      token_ids: list[list[int]], sampling):
    """The library's scheduler with every pending prompt queued (tagged by its index in `pending`), decoding
    --batch-size of them side by side, each up to its own max_new_tokens and with its own SamplingParams
    (`sampling`, None: greedy), all drafting from one DraftMemory of the last --draft-memory prompts (0: none,
    each prompt isolated)."""
    from ..decoding import schedule
    from ..drafting import DraftMemory

    limits = [entry.max_new_tokens for entry in pending]
    size = DEFAULT_DRAFT_MEMORY if args.draft_memory is None else args.draft_memory
    try:
        return schedule(model, token_ids, limits, config, source=args.source, batch_size=args.batch_size or 1,
                        sampling=sampling, memory=DraftMemory(max_requests=size) if size else None,
                        isolated=not size)
    except (ValueError, TypeError) as err:  # e.g. a step shape too large for the longest prompt
        raise CommandError(f"{args.prompts_file}: {err}") from err


def format_histogram(histogram: dict[str, int]) -> list[str]:
    """One bar per 'tokens committed in a step' value."""
    if not histogram:
        return ["  (no decode steps)"]
    most = max(histogram.values())
    lines = []
    for tokens, steps in histogram.items():
        bar = "#" * max(1, round(HISTOGRAM_WIDTH * steps / most))
        lines.append(f"  {tokens:>3} | {bar} {steps}")
    return lines


def format_report(result: dict) -> str:
    stats = result["stats"]
    config = result["config"]
    if config == "auto":
        title = "auto: step shapes calibrated for this device, one chosen before every step"
    elif config.get("device_drafts"):
        title = "drafted on the device, tree nodes {tree_nodes}, candidate length {candidate_length}".format(**config)
        from ..config import LookaheadConfig

        if LookaheadConfig(**config).has_window:
            title += ", window {window}, ngram {ngram}, guesses {guesses}".format(**config)
    else:
        title = "window {window}, ngram {ngram}, guesses {guesses}, candidate length {candidate_length}".format(**config)
    steps_by_shape = stats["shape_steps"]
    sampling = result["sampling"]
    lines = [
        "",
        f"-- lookahead decoding, {title}",
        *([] if sampling is None else ["sampling         " + ", ".join(f"{name} {value}" for name, value in
                                                                     sampling.items())]),
        *(f"  {entry['shape']:<40} {entry['cost_ms']:8.2f} ms/step, {steps_by_shape.get(entry['shape'], 0)} steps"
          if config == "auto" else f"  {entry['shape']}: {steps_by_shape.get(entry['shape'], 0)} steps"
          for entry in result["shapes"]),
        f"new tokens       {stats['new_tokens']}",
        f"steps            {stats['steps']}  (forward passes after the prefill)",
        f"tokens/step      {stats['tokens_per_step']:.2f}",
        f"tokens/s         {stats['tokens_per_second']:.1f}",
        f"seconds          {stats['seconds']:.2f}",
        "tokens committed per step (value | steps):",
        *format_histogram(stats["accepted_histogram"]),
    ]
    if "identical" in result:
        speedup = result["speedup"]
        lines += [
            "",
            "-- compared with greedy model.generate (wall time around each call, after a warm-up)",
            *(
                f"{name:<16} {speed['new_tokens']} tokens in {speed['seconds']:.2f} s = "
                f"{speed['tokens_per_second']:.1f} tokens/s"
                for name, speed in (("lookahead", result["lookahead"]), ("greedy", result["greedy"]))
            ),
            f"speedup          {speedup:.2f}x" if speedup is not None else "speedup          n/a",
            f"identical        {'yes, token for token' if result['identical'] else 'NO: the outputs differ'}",
        ]
    return "\n".join(lines)


