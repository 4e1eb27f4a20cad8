"""`lookahead bench`: the benchmark's command line (also `python -m lookahead_decoding.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli.common import (
    LOOKAHEAD_OPTIONS,
    CommandError,
    add_lookahead_arguments,
    add_model_arguments,
    add_sampling_arguments,
    check_compile,
    check_writable,
    non_negative_int,
    positive_int,
    sampling_from_args,
)
from .data import DATASETS

DEFAULT_METHODS = "greedy,pld,lookahead"
DEFAULT_REFERENCE = "greedy"
# HF generate decodes one prompt at a time here: batched runs compare the library's own engine with itself.
BATCHED_DEFAULT_METHODS = "ar-graph,lookahead"
BATCHED_DEFAULT_REFERENCE = "ar-graph"
# The built-in methods that never read the lookahead options or --source: a run of only these would ignore them.
PLAIN_METHODS = frozenset({"greedy", "pld", "hf-compiled", "ar-graph"})
# HF generate samples from torch's RNG, the library by draws keyed by (seed, position, token): only plain sampling
# on the library's engine commits the tokens that lookahead commits with the same seed.
SAMPLING_DEFAULT_REFERENCE = "ar-graph"
BENCH_EXTRA = ("tqdm", "matplotlib")  # what `pip install lookahead-decoding[bench]` adds
DEFAULT_SWEEP_WINDOW = "3,5,7,10,15"
DEFAULT_SWEEP_NGRAM = "3,4,5,6"
DEFAULT_PROFILE_STEPS = 32
EXIT_WRITE_FAILED = 1

DESCRIPTION = """\
Benchmark greedy decoding methods on MT-Bench, HumanEval or GSM8K prompts: every method runs on every prompt,
interleaved prompt by prompt on one loaded model, after a warm-up. Reports tokens/s, tokens per step (new tokens
per forward pass after the prefill), speedup over HF greedy and how often the output equals greedy's token for
token. --sweep instead compares lookahead configurations (W, N, G) with greedy; --profile shows where the
time of one decode step goes (plain decoding and lookahead, on the first prompt). --batch-size B[,B...] instead
decodes all the prompts through one call of B rows per method and batch size (continuous batching) and reports
throughput, speedup over ar-graph at the same batch size and exactness per batch size. --temperature T > 0 makes
every method sample instead (HF's `greedy` method is then reported as hf-sample), each prompt with the same seed
in every method; the exact-match rate then counts the outputs with the same tokens as the reference's (ar-graph
by default) with the same seed."""


def int_list(text: str) -> list[int]:
    """'3,5,7' -> [3, 5, 7]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def batch_size_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]: positive, each once."""
    sizes = int_list(text)
    for size in sizes:
        if size < 1:
            raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {size}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"a batch size is repeated in {text!r}")
    return sizes


def config_list(text: str) -> list[tuple[int, ...]]:
    """'3:4:3,7:5:7:8,15:5:15:8:60' -> (W, N, G), (W, N, G, K) or (W, N, G, K, tree nodes) tuples."""
    configs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            values = tuple(int(v) for v in part.split(":"))
        except ValueError:
            values = ()
        if len(values) not in (3, 4, 5):
            raise argparse.ArgumentTypeError(f"expected W:N:G, W:N:G:K or W:N:G:K:B separated by commas, got {part!r}")
        configs.append(values)
    if not configs:
        raise argparse.ArgumentTypeError("expected at least one W:N:G triple")
    return configs


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset", required=True, choices=list(DATASETS), help="which prompts (one dataset a run)")
    data.add_argument(
        "--data-file",
        metavar="PATH",
        help="local file in the upstream format (question.jsonl, HumanEval.jsonl.gz, test.jsonl), or for `prompts` "
        "JSON Lines with a \"prompt\" string on each line (needed); default: download through the `datasets` "
        "library",
    )
    data.add_argument("--limit", type=positive_int, metavar="K", help="first K prompts only (default: all)")

    run = parser.add_argument_group("run")
    add_model_arguments(run)
    run.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="M", help="default: 256")
    run.add_argument("--seed", type=non_negative_int, default=0,
                     help="seeds python's and torch's generators; with --temperature, prompt i (of the dataset) "
                     "samples with seed SEED + i in every method (default: 0)")
    run.add_argument("--threads", type=positive_int, metavar="T", help="torch.set_num_threads(T) (default: torch's)")
    run.add_argument(
        "--methods",
        # The registry's names would need torch imported for --help; an unknown name lists them.
        help=f"comma-separated method names (default: {DEFAULT_METHODS}; with --batch-size: "
        f"{BATCHED_DEFAULT_METHODS}); an unknown name is an error that lists the available ones; the --reference "
        "method always runs",
    )
    run.add_argument("--reference", choices=["greedy", "ar-graph"],
                     help="the greedy method every other is compared with (*_vs_greedy fields); ar-graph is the "
                     f"same greedy decoding on the fast engine, for long runs (default: {DEFAULT_REFERENCE}, HF "
                     f"generate; with --batch-size or --temperature: {BATCHED_DEFAULT_REFERENCE})")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the fast engine's step before capturing it (ar-graph, lookahead)")
    run.add_argument("--isolated", action="store_true",
                     help="decode every prompt apart from the others (ld.generate's isolated=True): a step that "
                     "drafts on the device (auto on CUDA) starts each prompt from blank tables of the model's "
                     "predictions, as HF prompt lookup and the reference code start each prompt afresh; default: "
                     "those tables carry what earlier prompts taught them (in batches, only a prompt that starts "
                     "on an idle engine starts blank)")
    add_lookahead_arguments(run)

    sampling = parser.add_argument_group("sampling")
    add_sampling_arguments(sampling)

    batched = parser.add_argument_group("batched")
    batched.add_argument("--batch-size", type=batch_size_list, metavar="B[,B...]",
                         help="decode all the prompts through one call of B rows per method, a finished row taking "
                         "the next prompt; a comma-separated list measures each batch size; methods: ar-graph, "
                         "lookahead (default: one prompt at a time)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="PATH", help="write the results as JSON")
    output.add_argument("--plot", metavar="PATH", help="write a PNG: speedup per method (per configuration with "
                        "--sweep) and lookahead's tokens committed per step; with --batch-size, speedup against "
                        "batch size")

    grid = parser.add_argument_group("sweep")
    grid.add_argument("--sweep", action="store_true", help="compare lookahead configurations with greedy instead")
    grid.add_argument("--sweep-window", type=int_list, metavar="W,...", help=f"default: {DEFAULT_SWEEP_WINDOW}")
    grid.add_argument("--sweep-ngram", type=int_list, metavar="N,...", help=f"default: {DEFAULT_SWEEP_NGRAM}")
    grid.add_argument("--sweep-guesses", type=int_list, metavar="G,...",
                      help="a third axis of the grid (default: G = W for every configuration)")
    grid.add_argument("--sweep-configs", type=config_list, metavar="W:N:G[:K[:B]],...",
                      help="an explicit list of configurations instead of the grid; K defaults to "
                      "--candidate-length, else N-1")

    profiling = parser.add_argument_group("profile")
    profiling.add_argument("--profile", action="store_true",
                           help="instead of benchmarking, profile the fused step of plain decoding and of lookahead "
                           "on the first prompt (the first B with --batch-size B): time per step by kind of work "
                           "(torch.profiler), the device-only step, its wall time while decoding and the host share")
    profiling.add_argument("--profile-steps", type=positive_int, metavar="S",
                           help=f"decode steps profiled, after a short warm-up (default: {DEFAULT_PROFILE_STEPS})")


def run_command(args: argparse.Namespace, model=None, tokenizer=None) -> int:
    """The `bench` handler: run, print the markdown table, write --out and --plot. `model`/`tokenizer` reuse a
    loaded model instead of loading --model."""
    for option, needs in (("sweep_window", "sweep"), ("sweep_ngram", "sweep"), ("sweep_guesses", "sweep"),
                          ("sweep_configs", "sweep"), ("profile_steps", "profile")):
        if getattr(args, option) is not None and not getattr(args, needs):
            raise CommandError(f"--{option.replace('_', '-')} needs --{needs}")
    fill_mode_defaults(args)
    shape_options = [f"--{name.replace('_', '-')}" for name in (*LOOKAHEAD_OPTIONS, "source")
                     if getattr(args, name) is not None]
    methods = {name.strip() for name in args.methods.split(",") if name.strip()}  # as parse_methods reads them
    if shape_options and not (args.sweep or args.profile) and methods <= PLAIN_METHODS:
        raise CommandError(f"{', '.join(shape_options)} {'sets' if len(shape_options) == 1 else 'set'} how lookahead "
                           f"drafts, but --methods {args.methods} runs no lookahead method")
    if args.profile and (args.sweep or args.plot):
        raise CommandError("--profile cannot be combined with --sweep or --plot")
    if args.profile and sampling_from_args(args, args.seed) is not None:
        raise CommandError("--profile profiles greedy decoding steps: it cannot be combined with --temperature")
    if args.batch_size and args.sweep:
        raise CommandError("--batch-size cannot be combined with --sweep")
    check_compile(args, None if model is None else model.device.type == "cuda")
    if args.batch_size and args.profile and len(args.batch_size) > 1:
        raise CommandError("--profile takes one --batch-size, got " + ",".join(map(str, args.batch_size)))
    # Output paths are checked before any work: a run can take hours.
    if args.out:
        check_writable("--out", args.out)
    if args.plot:
        check_plot_path(args.plot)
    try:
        result = measure_for(args)(args, model, tokenizer)
    except ImportError as err:  # the optional `datasets` package, or the [bench] extra
        raise CommandError(missing_package(err)) from err
    print(table_for(args)(result))
    return 0 if write_outputs(result, args) else EXIT_WRITE_FAILED


def fill_mode_defaults(args: argparse.Namespace) -> None:
    """--methods and --reference default by mode (HF greedy cannot run batched, nor draw the library's samples);
    filled in on `args` so that the JSON's config records what ran."""
    batched = args.batch_size is not None
    args.sweep_window = args.sweep_window or int_list(DEFAULT_SWEEP_WINDOW)
    args.sweep_ngram = args.sweep_ngram or int_list(DEFAULT_SWEEP_NGRAM)
    args.profile_steps = args.profile_steps or DEFAULT_PROFILE_STEPS
    if args.methods is None:
        args.methods = BATCHED_DEFAULT_METHODS if batched else DEFAULT_METHODS
    if args.reference is None:
        if batched:
            args.reference = BATCHED_DEFAULT_REFERENCE
        else:
            args.reference = SAMPLING_DEFAULT_REFERENCE if args.temperature else DEFAULT_REFERENCE


def measure_for(args: argparse.Namespace):
    """The run of this mode: fn(args, model, tokenizer) -> the result document. Imported here: torch loads slowly."""
    if args.profile:
        from .profile import run_profile

        return run_profile
    if args.batch_size:
        from .batched import bench_batched

        return bench_batched
    from .runner import bench, sweep

    return sweep if args.sweep else bench


def table_for(args: argparse.Namespace):
    """The markdown table of this mode's result document."""
    from . import report

    if args.profile:
        return report.profile_table
    if args.batch_size:
        return report.batched_table
    return report.sweep_table if args.sweep else report.bench_table


def plot_for(args: argparse.Namespace):
    """The --plot of this mode's result document."""
    from . import report

    if args.batch_size:
        return report.plot_batched
    return report.plot_sweep if args.sweep else report.plot_bench


def missing_package(err: ImportError) -> str:
    package = (err.name or "").partition(".")[0]
    if package in BENCH_EXTRA:
        return f"lookahead bench needs the {package!r} package: pip install 'lookahead-decoding[bench]'"
    return str(err)


def check_plot_path(path: str) -> None:
    """--plot: writable, in a format matplotlib writes (the suffix picks it), and matplotlib installed."""
    check_writable("--plot", path)
    try:
        from .report import plot_formats

        formats = plot_formats()
    except ImportError as err:
        raise CommandError(f"--plot: {missing_package(err)}") from err
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise CommandError(f"--plot {path}: unknown image format {suffix or '(none)'!r}; use one of "
                           f"{', '.join(sorted(formats))}")


def write_outputs(result: dict, args: argparse.Namespace) -> bool:
    """Writes --out and --plot; True when all went well. When a write still fails at the end, the results are not
    lost: a line on stderr says so and, unless --out was written, the JSON goes to stdout."""
    from .report import write_json

    saved = failed = False
    if args.out:
        try:
            write_json(result, args.out)
            print(f"\nresults: {args.out}")
            saved = True
        except OSError as err:
            print(f"lookahead: error: could not write --out {args.out} ({err.strerror or err})", file=sys.stderr)
            failed = True
    if args.plot:
        try:
            plot_for(args)(result, args.plot)
            print(f"plot: {args.plot}")
        except OSError as err:
            print(f"lookahead: error: could not write --plot {args.plot} ({err.strerror or err})", file=sys.stderr)
            failed = True
    if failed and not saved:
        print("\nresults (JSON):")
        print(json.dumps(result, indent=2))
    return not failed


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `bench` subcommand to the `lookahead` command line."""
    parser = subparsers.add_parser(
        "bench", help="benchmark greedy, prompt lookup and lookahead decoding on public prompts",
        description=DESCRIPTION,
    )
    add_bench_arguments(parser)
    parser.set_defaults(func=run_command)
    return parser


def main(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> int:
    """`lookahead bench ARGS` in-process; pass `model`/`tokenizer` to reuse a loaded model."""
    from ..cli import build_parser, main as lookahead_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if model is None:
        return lookahead_main(["bench", *argv])
    args = build_parser().parse_args(["bench", *argv])
    return args.func(args, model, tokenizer)
