"""The `lookahead` command line.

    lookahead generate "PROMPT" [--model PATH_OR_HUB_NAME] [--chat] [--compare] [--json] ...

Every subcommand is added by one `add_*_command(commands)` function that creates its subparser and sets
`func` (called with the parsed arguments, returns the exit code). Library errors (ValueError, TypeError,
FileNotFoundError) become a one-line `lookahead: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from collections.abc import Sequence

import torch
from transformers import TextStreamer
from transformers.utils import logging as hf_logging

from .bench import add_bench_parser
from .config import LookaheadConfig
from .decoding import generate
from .models import default_model_path, load_default_model, load_model

EXIT_USAGE = 2
WARMUP_TOKENS = 8
HISTOGRAM_WIDTH = 40


class CommandError(ValueError):
    """A problem with the command's input, reported like a library ValueError."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype, shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        metavar="PATH_OR_HUB_NAME",
        help="local HF model folder, .gguf file or Hub name (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto (cuda if available)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights and activations; default float32 on every device, the safest for exact greedy equality",
    )


def quiet_transformers() -> None:
    """Errors only from transformers' logger and no transformers progress bars."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) for --model/--device/--dtype, without the GGUF loader's progress bars."""
    quiet_transformers()
    # The GGUF de-quantisation bar is a plain tqdm on stderr that no transformers switch turns off. Loading
    # errors come back as exceptions, so nothing of value is lost.
    with contextlib.redirect_stderr(io.StringIO()):
        if args.model is None:
            return load_default_model(device=args.device, dtype=args.dtype)
        return load_model(args.model, device=args.device, dtype=args.dtype)


def encode_prompt(tokenizer, prompt: str, chat: bool):
    """input_ids [1, prompt_len] for a plain prompt, or for one user turn through the chat template."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise CommandError("--chat: this model's tokenizer has no chat template")
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    # transformers 5 returns a BatchEncoding here, earlier versions a bare tensor.
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


# ---------------------------------------------------------------------------------------------- generate


def add_generate_command(commands) -> None:
    defaults = LookaheadConfig()
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
    parser.add_argument(
        "--window", type=int, default=defaults.window, metavar="W", help=f"Jacobi window columns (default: {defaults.window})"
    )
    parser.add_argument(
        "--ngram", type=int, default=defaults.ngram, metavar="N", help=f"n-gram size, >= 2 (default: {defaults.ngram})"
    )
    parser.add_argument(
        "--guesses",
        type=int,
        default=defaults.guesses,
        metavar="G",
        help=f"candidates verified per step, >= 0 (default: {defaults.guesses})",
    )
    parser.add_argument(
        "--candidate-length", type=int, metavar="K", help="tokens per candidate, >= 1 (default: N-1)"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run plain greedy model.generate, timed the same way, and check the outputs are identical",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streamed text")
    parser.set_defaults(func=run_generate)


class SilentStreamer(TextStreamer):
    """Decodes every token like TextStreamer but prints nothing: gives a timed run the same streaming cost."""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        pass


def _timed(call, device: torch.device):
    """(result, wall seconds) of call(), with queued GPU work finished on both ends."""
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
    if not args.prompt.strip():
        raise CommandError("the prompt is empty")
    # Checked before the (slow) model load so that bad knobs fail at once.
    config = LookaheadConfig(window=args.window, ngram=args.ngram, guesses=args.guesses,
                             candidate_length=args.candidate_length)
    model, tokenizer = load_from_args(args)
    input_ids = encode_prompt(tokenizer, args.prompt, args.chat).to(model.device)
    prompt_len = input_ids.shape[1]
    decode_kwargs = {"skip_special_tokens": True}
    stream = not args.json

    def lookahead(max_new_tokens: int, streamer=None):
        return generate(model, input_ids, max_new_tokens=max_new_tokens, config=config, streamer=streamer)

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
        "config": {"window": config.window, "ngram": config.ngram, "guesses": config.guesses,
                   "candidate_length": config.candidate_length},
        "max_new_tokens": args.max_new_tokens,
        "text": tokenizer.decode(new_ids, **decode_kwargs),
        "stats": out.stats.as_dict(),
    }
    if args.compare:
        # Same treatment as the lookahead run: wall time around the whole call, and a streamer that decodes
        # every token (without printing) when the lookahead run streamed.
        silent = SilentStreamer(tokenizer, skip_prompt=True, **decode_kwargs) if stream else None
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
    lines = [
        "",
        "-- lookahead decoding: window {window}, ngram {ngram}, guesses {guesses}, candidate length "
        "{candidate_length}".format(**result["config"]),
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


# ---------------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookahead", description="Exact lookahead decoding for Hugging Face decoder-only models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_command(commands)
    add_bench_parser(commands)
    return parser


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage error (or the help)
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"lookahead: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
