"""The `lookahead` command line.

    lookahead generate "PROMPT" [--model PATH_OR_HUB_NAME] [--chat] [--compare] [--json] ...
    lookahead bench --dataset NAME [--methods ...] [--out PATH] [--plot PATH] ...
    lookahead tune [--model PATH_OR_HUB_NAME | --random-shape NAME] [--plot PATH] [--json]
    lookahead serve [--model PATH_OR_HUB_NAME] [--host 127.0.0.1] [--port 8000] [--batch-size B] [--api-key KEY]
    lookahead bench-serve --dataset NAME [--url URL] [--concurrency 1,8,32,64] [--out PATH] [--plot PATH]

Every subcommand is added by one `add_*` function that creates its subparser and sets `func` (called with the
parsed arguments, returns the exit code). Arguments are parsed before torch or transformers is imported, so
`--help` and usage errors answer at once. Library errors (ValueError, TypeError, FileNotFoundError) become a
one-line `lookahead: error: ...` on stderr and exit code 2; a run that cannot go on (common.RunError) the same
line and exit code 1; Ctrl-C exits with 130, at any point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .common import EXIT_FAILED, EXIT_USAGE, RunError
from .generate import add_generate_command
from .serve import add_serve_command
from .tune import add_tune_command

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    # Imported here: bench's command line imports .common of this package.
    from ..bench.cli import add_bench_parser
    from ..bench.serve_load import add_bench_serve_parser

    parser = argparse.ArgumentParser(
        prog="lookahead", description="Exact lookahead decoding for Hugging Face decoder-only models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_command(commands)
    add_bench_parser(commands)
    add_tune_command(commands)
    add_serve_command(commands)
    add_bench_serve_parser(commands)
    # Options are spelled out: an abbreviation is taken for whichever option it begins (`--prompt` for
    # --prompts-file), and the error that follows names the wrong one.
    for command in (parser, *commands.choices.values()):
        command.allow_abbrev = False
    return parser


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


def main(argv: Sequence[str] | None = None) -> int:
    # One try around everything, lazy imports and model loading included, so that Ctrl-C never shows a traceback.
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # argparse has printed the usage error (or the help)
            return exit_.code if isinstance(exit_.code, int) else 0
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RunError) as err:
        print(f"lookahead: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_FAILED if isinstance(err, RunError) else EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)  # ends the line the terminal's ^C is on
        return EXIT_INTERRUPTED
