"""`lookahead generate`: lookahead decoding of one prompt, streamed, with statistics (and --compare: plain greedy
model.generate on the same prompt, timed the same way). torch and transformers are imported when it runs."""

from __future__ import annotations

import argparse
import json
import time

from .common import (
    CommandError,
    add_lookahead_arguments,
    add_model_arguments,
    check_text,
    config_dict,
    config_from_args,
    encode_prompt,
    load_from_args,
    positive_int,
)

WARMUP_TOKENS = 8
HISTOGRAM_WIDTH = 40


def add_generate_command(commands) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate text with lookahead decoding, streamed as it is produced",
        description="Generate greedily with lookahead decoding and print statistics; --compare also times "
        "plain greedy model.generate on the same prompt and checks that both outputs are identical.",
    )
    parser.add_argument("prompt", help="the prompt text")
    add_model_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N", help="default: 128")
    add_lookahead_arguments(parser)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run plain greedy model.generate, timed the same way, and check the outputs are identical",
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


def run_generate(args: argparse.Namespace) -> int:
    # Input is checked before the (slow) imports and model load so that bad input fails at once.
    if not args.prompt.strip():
        raise CommandError("the prompt is empty")
    check_text(args.prompt, "the prompt")
    config = config_from_args(args)  # None: the library's choice

    import torch
    from transformers import TextStreamer

    from ..decoding import generate
    from ..tuning import shape_name
    from ..models import default_model_path

    model, tokenizer = load_from_args(args)
    input_ids = encode_prompt(tokenizer, args.prompt, args.chat).to(model.device)
    prompt_len = input_ids.shape[1]
    decode_kwargs = {"skip_special_tokens": True}
    stream = not args.json

    def lookahead(max_new_tokens: int, streamer=None):
        return generate(model, input_ids, max_new_tokens=max_new_tokens, config=config, streamer=streamer,
                        source=args.source)

    def greedy(max_new_tokens: int, streamer=None):
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
        )

    if args.compare:
        # One-off costs (allocator, kernel selection, lazy init) land on the first calls: pay them for both.
        warmup = min(WARMUP_TOKENS, args.max_new_tokens)
        lookahead(warmup)
        greedy(warmup)

    streamer = TextStreamer(tokenizer, skip_prompt=True, **decode_kwargs) if stream else None
    out, lookahead_seconds = _timed(lambda: lookahead(args.max_new_tokens, streamer), model.device)
    new_ids = out.sequences[0, prompt_len:].tolist()
    result = {
        "prompt": args.prompt,
        "chat": args.chat,
        "prompt_tokens": prompt_len,
        "model": args.model or str(default_model_path()),
        "config": "auto" if config is None else config_dict(config),
        "source": list(args.source) if args.source else "default",
        # The step shapes the run could use (costs in ms per step as calibrated); stats.shape_steps says how often.
        "shapes": [{"shape": shape_name(shape), **config_dict(shape), "cost_ms": cost}
                   for shape, cost in zip(out.plan.shapes, out.plan.costs_ms)],
        "max_new_tokens": args.max_new_tokens,
        "text": tokenizer.decode(new_ids, **decode_kwargs),
        "stats": out.stats.as_dict(),
    }
    if args.compare:
        # Same treatment as the lookahead run: wall time around the whole call, and a streamer that decodes
        # every token (without printing) when the lookahead run streamed.
        silent = _silent_streamer(tokenizer, **decode_kwargs) if stream else None
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
    else:
        title = "window {window}, ngram {ngram}, guesses {guesses}, candidate length {candidate_length}".format(**config)
    steps_by_shape = stats["shape_steps"]
    lines = [
        "",
        f"-- lookahead decoding, {title}",
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


