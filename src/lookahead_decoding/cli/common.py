"""Command-line pieces shared by `lookahead generate` and `lookahead bench`.

Nothing here imports torch or transformers at module level: `--help` and argument errors answer without them,
and a command imports what it needs only once its arguments are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
from pathlib import Path

EXIT_FAILED = 1
EXIT_USAGE = 2
LOOKAHEAD_OPTIONS = ("window", "ngram", "guesses", "candidate_length", "tree_nodes", "device_drafts")
WARPER_OPTIONS = ("top_k", "top_p", "min_p")  # shape the sampled distribution: only used when sampling
PENALTY_OPTIONS = ("repetition_penalty", "presence_penalty", "frequency_penalty")  # greedy decoding too
SOURCE_NAMES = ("pool", "suffix", "recycled")  # drafting.sources.SOURCE_NAMES, without importing torch


class CommandError(ValueError):
    """A problem with the command's input, reported like a library ValueError."""


class RunError(Exception):
    """The command cannot do its work though its input is good: its output is in use by another run, cannot be read
    back, or cannot be written. One line, exit code 1."""


def positive_int(text: str) -> int:
    return _integer_from(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _integer_from(text, 0, "a non-negative integer")


def _integer_from(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def add_model_arguments(parser) -> None:
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


def wants_cuda(args: argparse.Namespace) -> bool:
    """Whether the model will load on CUDA: --device cuda, or auto on a machine that has it."""
    import torch

    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def check_compile(args: argparse.Namespace, on_cuda: bool | None = None) -> None:
    """Refuse --compile off CUDA. `on_cuda`: whether a loaded model is there (None: what --device asks for)."""
    if args.compile and not (wants_cuda(args) if on_cuda is None else on_cuda):
        raise CommandError("--compile needs a CUDA device: it compiles the engine's CUDA-graph steps")


def add_lookahead_arguments(parser) -> None:
    """--window/--ngram/--guesses/--candidate-length/--tree-nodes/--device-drafts and --source. Each defaults to
    None: the library decides."""
    parser.add_argument("--window", type=int, metavar="W", help="Jacobi window columns (default: the library's)")
    parser.add_argument("--ngram", type=int, metavar="N", help="n-gram size, >= 2 (default: the library's)")
    parser.add_argument("--guesses", type=int, metavar="G",
                        help="n-grams kept per key in the pool, >= 0 (default: the library's)")
    parser.add_argument("--candidate-length", type=int, metavar="K",
                        help="the longest draft verified (the tree's depth), >= 1 (default: N-1)")
    parser.add_argument("--tree-nodes", type=int, metavar="B",
                        help="draft tokens verified per step, as one token tree, >= 0 (default: G*K)")
    parser.add_argument("--device-drafts", action="store_true", default=None,
                        help="draft the tree on the device (the model's recent top-k predictions, copies of the "
                        "text, and with --window/--ngram the window's n-grams, G of them per step) instead of the "
                        "sources; alone, the step `auto` drafts with at batch 1 on CUDA (no window, K=12, B=63)")
    parser.add_argument("--source", type=source_list, metavar="NAME[,NAME...]",
                        help=f"where drafts come from: {', '.join(SOURCE_NAMES)}, or several joined by commas "
                             "(default: all three)")


def source_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in SOURCE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected source names from {', '.join(SOURCE_NAMES)}, got {text!r}")
    return names


def config_from_args(args: argparse.Namespace):
    """The LookaheadConfig of the lookahead options given (library defaults for the others), or None when none was
    given. Built, and so validated, before any model is loaded."""
    given = {name: getattr(args, name, None) for name in LOOKAHEAD_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return None
    from ..config import LookaheadConfig

    return LookaheadConfig(**given)


def add_sampling_arguments(parser, penalties: bool = False) -> None:
    """--temperature and --top-k/--top-p/--min-p; with `penalties`, --repetition-penalty/--presence-penalty/
    --frequency-penalty too. Each is off unless given; SamplingParams checks the values."""
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sample at temperature T > 0 instead of decoding greedily (default: 0, greedy)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="with --temperature: sample from the K most likely tokens only (default: off)")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="with --temperature: sample from the most likely tokens that hold probability P, "
                        "0 < P <= 1 (default: off)")
    parser.add_argument("--min-p", type=float, metavar="P",
                        help="with --temperature: drop the tokens less likely than P times the most likely one, "
                        "0 <= P <= 1 (default: off)")
    if not penalties:
        return
    parser.add_argument("--repetition-penalty", type=float, metavar="R",
                        help="HF's repetition penalty on every token of the prompt and output, > 0 (default: 1, off)")
    parser.add_argument("--presence-penalty", type=float, metavar="X",
                        help="OpenAI's presence penalty on the output's tokens (default: 0, off)")
    parser.add_argument("--frequency-penalty", type=float, metavar="X",
                        help="OpenAI's frequency penalty on the output's tokens (default: 0, off)")


def sampling_from_args(args: argparse.Namespace, seed: int | None):
    """The SamplingParams of the sampling options, or None for plain greedy decoding (no --temperature, no penalty).
    When they sample, `seed` seeds them (None: the caller draws a seed and replaces the placeholder 0). Built, and
    so checked, before any model is loaded: a bad value is a ValueError that names it. --top-k/--top-p/--min-p
    without --temperature are refused, as greedy decoding would ignore them."""
    warpers = [name for name in WARPER_OPTIONS if getattr(args, name) is not None]
    if warpers and not args.temperature:
        raise CommandError(f"--{warpers[0].replace('_', '-')} shapes the sampled distribution: it needs "
                           "--temperature > 0")
    from ..sampling_params import SamplingParams

    given = {name: getattr(args, name, None) for name in (*WARPER_OPTIONS, *PENALTY_OPTIONS)}
    params = SamplingParams(temperature=args.temperature, **{name: value for name, value in given.items()
                                                             if value is not None})
    if params.is_plain_greedy:
        return None
    return dataclasses.replace(params, seed=seed) if params.samples and seed is not None else params


def config_dict(config) -> dict:
    """A LookaheadConfig's shape as JSON."""
    return {name: getattr(config, name) for name in LOOKAHEAD_OPTIONS}


def check_text(text: str, what: str) -> None:
    """Rejects text no tokenizer can take: bytes that are not UTF-8 reach Python's argv as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start:err.end]
        raise CommandError(
            f"{what} is not valid UTF-8 text: undecodable character {bad!r} at position {err.start} "
            "(was it written in another encoding?)"
        ) from None


def check_prompt(prompt: str, what: str) -> None:
    """Rejects a prompt that is empty or blank, or that no tokenizer can take."""
    if not prompt.strip():
        raise CommandError(f"{what} is empty")
    check_text(prompt, what)


def check_writable(option: str, path: str) -> None:
    """Rejects an output path that cannot be written, before any work is done. Creating the file (and removing it
    again) is the one check that also holds for root, read-only mounts and special file systems."""
    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{option} {path}: is a folder, not a file")
    if not target.parent.is_dir():
        raise CommandError(f"{option} {path}: the folder {target.parent} does not exist")
    existed = target.exists()
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise CommandError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    if not existed:
        os.remove(target)


def quiet_transformers() -> None:
    """Errors only from transformers' logger and no transformers progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) for --model/--device/--dtype, without the GGUF loader's progress bars."""
    from .. import models

    quiet_transformers()
    # The GGUF de-quantisation bar is a plain tqdm on stderr that no transformers switch turns off. Loading
    # errors come back as exceptions, so nothing of value is lost.
    with contextlib.redirect_stderr(io.StringIO()):
        if args.model is None:
            return models.load_default_model(device=args.device, dtype=args.dtype)
        return models.load_model(args.model, device=args.device, dtype=args.dtype)


NO_CHAT_TEMPLATE = "--chat: this model's tokenizer has no chat template"


def encode_prompt(tokenizer, prompt: str, chat: bool, no_template: str = NO_CHAT_TEMPLATE):
    """input_ids [1, prompt_len] for a plain prompt, or for one user turn through the chat template; `no_template`
    is the error when the tokenizer has none."""
    check_text(prompt, "the prompt")
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}], no_template)


def encode_chat(tokenizer, messages: list[dict], no_template: str = NO_CHAT_TEMPLATE):
    """input_ids [1, prompt_len] for a conversation ({"role", "content"} messages) through the chat template,
    ending where the assistant's next turn begins; `no_template` is the error when the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise CommandError(no_template)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    # transformers 5 returns a BatchEncoding here, earlier versions a bare tensor.
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded
