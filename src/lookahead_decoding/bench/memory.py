"""A bulk run with the draft memory on and off: HumanEval prompts, then MT-Bench first turns, then their second
turns, each request decoded twice side by side, once isolated and once drafting from a DraftMemory that has seen
the requests before it (as `lookahead generate --prompts-file` does by default, and `--draft-memory 0` does not).

A second turn's prompt is the conversation so far: the first question, the model's own answer to it (from the
same mode's run) and the second question. Reported per request and per phase: tokens per step (new tokens per
forward pass after the prefill), tokens/s, and whether both modes produced the same tokens; as a markdown table,
JSON (--out) and a plot of tokens per step against request index (--plot). Without shape options the step plan is
"auto"'s, calibrated (or read from the cache) once: every request of both modes runs with that one plan.

    python scripts/bench_memory.py --data-dir DIR --out memory.json --plot memory.png [--limit K] [--model ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli.common import (
    CommandError,
    add_lookahead_arguments,
    add_model_arguments,
    check_writable,
    config_dict,
    positive_int,
)
from ..cli.generate import DEFAULT_DRAFT_MEMORY
from ..jsonl import JsonLinesError, read_objects
from .cli import check_plot_path, missing_package
from .data import Prompt, load_file

FILES = {"humaneval": "HumanEval.jsonl.gz", "mtbench": "question.jsonl"}
DEFAULT_COUNTS = {"humaneval": 100, "mtbench": 80}
PHASES = ("humaneval", "mtbench-turn-1", "mtbench-turn-2")
MODES = ("off", "on")  # the memory's
ROLLING = 10  # requests in the plot's moving average
WARMUP_TOKENS = 8


def load_conversations(path: str | Path, limit: int) -> list[tuple[str, str]]:
    """The first two turns of the first `limit` questions of MT-Bench's question.jsonl."""
    conversations = []
    for line, record in read_objects(path):
        turns = record.get("turns")
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(turn, str) and turn.strip()
                                                                    for turn in turns[:2])):
            raise JsonLinesError(path, line, 'field "turns" must be a list whose first two turns are non-empty '
                                 "strings")
        conversations.append((turns[0], turns[1]))
        if len(conversations) == limit:
            break
    if not conversations:
        raise ValueError(f"{path}: no questions found")
    return conversations


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict:
    """Every request with the memory off and on, interleaved request by request; the result document."""
    import torch

    from ..cli.common import encode_chat, encode_prompt, load_from_args, quiet_transformers
    from ..decoding import AUTO, generate, resolve_plan
    from ..drafting import DraftMemory
    from .methods import lookahead_config
    from ..tuning import StepPlan
    from .runner import environment, no_template_message, run_config, stopwatch, tokens_per_step

    from tqdm import tqdm

    counts = {name: min(count, args.limit or count) for name, count in (("humaneval", args.humaneval),
                                                                        ("mtbench", args.mtbench))}
    data = Path(args.data_dir)
    code = load_file("humaneval", data / FILES["humaneval"], counts["humaneval"])
    conversations = load_conversations(data / FILES["mtbench"], counts["mtbench"])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if model is None:
        model, tokenizer = load_from_args(args)
    quiet_transformers()
    config = lookahead_config(args)
    if config == AUTO:  # one plan for the whole run: measuring it again between the two modes would confound them
        config = resolve_plan(model, AUTO)
    memory = DraftMemory(max_requests=args.draft_memory)
    no_template = no_template_message(Prompt("mtbench", 0, conversations[0][0], chat=True))
    device = model.device
    answers: dict[str, list[str]] = {mode: [] for mode in MODES}  # first-turn answers, per mode

    def encode(phase: str, item: int, mode: str):
        if phase == "humaneval":
            return encode_prompt(tokenizer, code[item].text, chat=False).to(device)
        first, second = conversations[item]
        messages = [{"role": "user", "content": first}]
        if phase == "mtbench-turn-2":
            messages += [{"role": "assistant", "content": answers[mode][item]}, {"role": "user", "content": second}]
        return encode_chat(tokenizer, messages, no_template).to(device)

    def decode(input_ids, mode: str):
        return generate(model, input_ids, args.max_new_tokens, config, source=args.source,
                        memory=memory if mode == "on" else None, isolated=mode == "off")

    decode(encode("humaneval", 0, "off")[:, :WARMUP_TOKENS], "off")  # one-off costs, outside the figures
    order = [("humaneval", i) for i in range(len(code))] + [
        (phase, i) for phase in PHASES[1:] for i in range(len(conversations))]
    records: list[dict] = []
    for phase, item in tqdm(order, desc="requests", unit="request", file=sys.stderr):
        record: dict = {"index": len(records), "phase": phase, "item": item}
        sequences = {}
        for mode in MODES:
            input_ids = encode(phase, item, mode)
            out, seconds = stopwatch(device, lambda: decode(input_ids, mode))
            stats = out.stats
            sequences[mode] = out.sequences[0].tolist()
            record[mode] = {"prompt_tokens": input_ids.shape[1], "new_tokens": stats.new_tokens, "steps": stats.steps,
                            "tokens_per_step": tokens_per_step(stats.new_tokens, stats.steps), "seconds": seconds}
            if phase == "mtbench-turn-1":
                answers[mode].append(tokenizer.decode(out.sequences[0, input_ids.shape[1]:],
                                                      skip_special_tokens=True))
        record["identical"] = sequences["on"] == sequences["off"]
        records.append(record)
    return {
        "config": {**run_config(args), "counts": counts,
                   "lookahead": config.as_dict() if isinstance(config, StepPlan) else config_dict(config)},
        "environment": environment(model, args),
        "requests": records,
        "summary": summarize(records),
    }


def totals(records: Sequence[dict], mode: str) -> dict:
    new_tokens = sum(record[mode]["new_tokens"] for record in records)
    steps = sum(record[mode]["steps"] for record in records)
    seconds = sum(record[mode]["seconds"] for record in records)
    return {"new_tokens": new_tokens, "steps": steps, "tokens_per_step": new_tokens / max(steps, 1),
            "seconds": seconds, "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0}


def summarize(records: Sequence[dict]) -> dict[str, dict]:
    """Per phase and for the whole run ("all"): each mode's totals, the ratios on / off and the identical count."""
    groups = {phase: [record for record in records if record["phase"] == phase] for phase in PHASES}
    summary = {}
    for name, group in {**groups, "all": list(records)}.items():
        if not group:
            continue
        off, on = totals(group, "off"), totals(group, "on")
        summary[name] = {
            "n": len(group), "off": off, "on": on,
            "tokens_per_step_ratio": on["tokens_per_step"] / off["tokens_per_step"],
            "speedup": on["tokens_per_second"] / off["tokens_per_second"] if off["tokens_per_second"] else None,
            "identical": sum(record["identical"] for record in group),
        }
    return summary


def table(result: dict) -> str:
    from .report import _table

    header = ["phase", "n", "tokens/step off", "tokens/step on", "ratio", "tokens/s off", "tokens/s on", "speedup",
              "identical"]
    lines = [[name, str(entry["n"]), f"{entry['off']['tokens_per_step']:.2f}", f"{entry['on']['tokens_per_step']:.2f}",
              f"{entry['tokens_per_step_ratio']:.2f}x", f"{entry['off']['tokens_per_second']:.1f}",
              f"{entry['on']['tokens_per_second']:.1f}",
              "n/a" if entry["speedup"] is None else f"{entry['speedup']:.2f}x", f"{entry['identical']}/{entry['n']}"]
             for name, entry in result["summary"].items()]
    return (f"### draft memory of {result['config']['draft_memory']} requests, on and off\n\n"
            + _table(header, lines))


def moving_average(values: Sequence[float], width: int) -> list[float]:
    """The mean of each value and the up to `width` - 1 before it."""
    return [sum(values[max(0, i - width + 1): i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]


def plot(result: dict, path: str | Path) -> None:
    """Tokens per step of every request against its index, memory on and off (points, and a moving average),
    with the phases marked."""
    from .report import _pyplot, _subtitle

    plt = _pyplot()
    records, summary = result["requests"], result["summary"]
    index = [record["index"] for record in records]
    figure, axis = plt.subplots(figsize=(11, 4.5))
    phases = [[record for record in records if record["phase"] == phase] for phase in PHASES]
    for mode, color in zip(MODES, ("tab:grey", "tab:blue")):
        axis.plot(index, [record[mode]["tokens_per_step"] for record in records], ".", color=color, alpha=0.35,
                  markersize=4)
        for number, phase in enumerate(filter(None, phases)):  # the average starts again with each phase
            axis.plot([record["index"] for record in phase],
                      moving_average([record[mode]["tokens_per_step"] for record in phase], ROLLING), color=color,
                      label=None if number else f"memory {mode}: {summary['all'][mode]['tokens_per_step']:.2f} "
                      f"tokens/step (line: mean of the last {ROLLING})")
    for phase in filter(None, phases):
        axis.axvline(phase[0]["index"] - 0.5, color="black", linewidth=0.6, linestyle=":")
        axis.annotate(phase[0]["phase"], (phase[0]["index"], 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                      textcoords="offset points", fontsize=8)
    overall = summary["all"]
    axis.set_title(f"draft memory of {result['config']['draft_memory']} requests: "
                   f"{overall['tokens_per_step_ratio']:.2f}x tokens per step, "
                   f"{overall['identical']}/{overall['n']} outputs identical")
    axis.set_xlabel("request (in the order run)")
    axis.set_ylabel("tokens per step")
    axis.set_ylim(bottom=0)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    figure.suptitle(_subtitle(result), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_memory.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, metavar="DIR",
                        help=f"a folder with HumanEval's {FILES['humaneval']} and MT-Bench's {FILES['mtbench']}")
    for name, count in DEFAULT_COUNTS.items():
        parser.add_argument(f"--{name}", type=positive_int, default=count, metavar="N",
                            help=f"the first N prompts of {name} (default: {count})")
    parser.add_argument("--limit", type=positive_int, metavar="K", help="at most K prompts of each dataset (a "
                        "smoke test)")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="M", help="default: 256")
    parser.add_argument("--draft-memory", type=positive_int, default=DEFAULT_DRAFT_MEMORY, metavar="N",
                        help=f"the memory's size in requests (default: {DEFAULT_DRAFT_MEMORY}, as --prompts-file's)")
    parser.add_argument("--threads", type=positive_int, metavar="T", help="torch.set_num_threads(T)")
    add_lookahead_arguments(parser)
    parser.add_argument("--out", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write the plot (PNG, or another format by its suffix)")
    return parser


def main(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> int:
    """The benchmark in-process; pass `model`/`tokenizer` to reuse a loaded model. Bad input is one line on stderr
    and exit code 2."""
    args = build_parser().parse_args(argv)
    from .report import write_json

    try:
        if args.out:
            check_writable("--out", args.out)
        if args.plot:
            check_plot_path(args.plot)
        try:
            result = run(args, model, tokenizer)
        except ImportError as err:  # the [bench] extra
            raise CommandError(missing_package(err)) from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"bench_memory.py: error: {err}", file=sys.stderr)
        return 2
    print(table(result))
    if args.out:
        write_json(result, args.out)
        print(f"\nresults: {args.out}")
    if args.plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0
