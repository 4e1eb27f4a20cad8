"""Presenting results: markdown tables on stdout, the JSON document, and the plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Hashable
from pathlib import Path

COLUMNS = ("n", "new tokens", "seconds", "tokens/s", "tokens/step")


def sampling_of(result: dict) -> dict | None:
    """The sampling parameters of a sampling run, None for a greedy one (or a document from before sampling)."""
    return result["config"].get("sampling")


def baseline(result: dict, reference: str) -> str:
    """What the speedups are over: greedy decoding (whichever method ran it), or in a sampling run the reference."""
    return reference if sampling_of(result) else "greedy"


def match_header(result: dict, reference: str) -> str:
    """The exact-match column: the same tokens as greedy's, or in a sampling run as the reference's with the same
    seed."""
    return f"same tokens as {reference}, same seed" if sampling_of(result) else f"identical to {reference}"


def comparison_columns(result: dict, reference: str) -> list[str]:
    """The headers of the speedup and exact-match columns of the summary tables."""
    compared_with = baseline(result, reference)
    return [f"speedup vs {compared_with}", match_header(result, compared_with)]


def sampling_note(result: dict, hf_methods: bool) -> str:
    """For a sampling run, the paragraph under the title: its parameters and seeds (and what HF methods draw)."""
    sampling = sampling_of(result)
    if sampling is None:
        return ""
    top_p = sampling["top_p"] if sampling["top_p"] < 1 else "off"
    note = (f"\n\nsampling at temperature {sampling['temperature']} (top-k {sampling['top_k'] or 'off'}, top-p "
            f"{top_p}, min-p {sampling['min_p'] or 'off'}), prompt i with seed {sampling['seed']} + i in every "
            "method")
    if hf_methods:
        note += ("; HF methods (hf-sample: model.generate(do_sample=True)) draw from torch's RNG, not by the "
                 "library's (seed, position, token) keys, so their tokens differ from the library's")
    return note + "."


def _cells(entry: dict) -> list[str]:
    speedup = entry["speedup_vs_greedy"]
    return [
        str(entry["n"]),
        str(entry["new_tokens"]),
        f"{entry['seconds']:.2f}",
        f"{entry['tokens_per_second']:.2f}",
        f"{entry['tokens_per_step']:.2f}",
        "n/a" if speedup is None else f"{speedup:.2f}x",
        f"{entry['identical_to_greedy']:.0%}",
    ]


def _table(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def bench_table(result: dict) -> str:
    """One markdown table per dataset, a line per method."""
    parts = []
    for dataset, summary in result["summary"].items():
        lines = [[method, *_cells(entry)] for method, entry in summary.items()]
        header = ["method", *COLUMNS, *comparison_columns(result, next(iter(summary)))]  # the reference runs first
        parts.append(f"### {dataset}{sampling_note(result, hf_methods=True)}\n\n" + _table(header, lines))
    return "\n\n".join(parts)


def sweep_table(result: dict) -> str:
    """The sweep's configurations, best first, under the reference's line."""
    (dataset, summary), = result["summary"].items()
    reference = next(iter(summary))  # the reference runs first
    keys = ("window", "ngram", "guesses", "candidate_length", "tree_nodes")
    lines = [[reference, *[""] * len(keys), *_cells(summary[reference])]]
    lines += [["lookahead", *(str(e[key]) for key in keys), *_cells(e)] for e in result["sweep"]]
    header = ["method", "W", "N", "G", "K", "B", *COLUMNS, *comparison_columns(result, reference)]
    return f"### {dataset}: sweep{sampling_note(result, hf_methods=False)}\n\n" + _table(header, lines)


def group_by(records: list[dict], key: Callable[[dict], Hashable]) -> dict:
    """{key: its records}, in the order the keys first appear."""
    groups: dict = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def _batched_cells(record: dict) -> list[str]:
    speedup = record["speedup"]
    return [
        str(record["batch_size"]),
        record["method"],
        f"{record['throughput_tokens_per_s']:.1f}",
        "n/a" if speedup is None else f"{speedup:.2f}x",
        f"{record['tokens_per_step_per_row']:.2f}",
        str(record["forwards"]),
        f"{record['identical']}/{record['prompts']}",
        record["plan"],
    ]


def batched_table(result: dict) -> str:
    """One markdown table per dataset, a line per batch size and method."""
    parts = []
    for dataset, records in group_by(result["batched"], lambda record: record["dataset"]).items():
        reference = records[0]["reference"]
        header = ["batch size", "method", "tokens/s", f"speedup vs {reference}", "tokens/step per row", "forwards",
                  match_header(result, reference), "plan"]
        title = f"### {dataset}: batched, {records[0]['prompts']} prompts{sampling_note(result, hf_methods=False)}"
        parts.append(f"{title}\n\n" + _table(header, [_batched_cells(record) for record in records]))
    return "\n\n".join(parts)


def profile_table(result: dict) -> str:
    """Microseconds per step by kind of work, a column per profiled method."""
    entries = result["profile"]["methods"]
    labels = list(entries)
    kinds = list(dict.fromkeys(kind for entry in entries.values() for kind in entry["by_kind"]))
    header = ["per step", *labels]
    lines = [["tokens in the step", *(str(entries[m]["step_tokens"]) for m in labels)],
             ["KV cache slots", *(str(entries[m]["cache_slots"]) for m in labels)]]
    if all(entries[m]["kernels_per_step"] is not None for m in labels):
        lines.append(["kernels", *(f"{entries[m]['kernels_per_step']:.0f}" for m in labels)])
    timer = entries[labels[0]]["timer"]
    lines += [[f"{kind} (µs)", *(f"{entries[m]['by_kind'].get(kind, 0.0):.0f}" for m in labels)] for kind in kinds]
    lines.append([f"total {timer} time (µs)", *(f"{entries[m]['microseconds_per_step']:.0f}" for m in labels)])
    lines.append(["attention widths decoding read: steps", *(", ".join(
        f"{width}: {steps}" for width, steps in entries[m]["steps_by_width"].items()) for m in labels)])
    lines.append(["captured step at those widths, back to back (ms)",
                  *(f"{entries[m]['captured_step_ms']:.3f}" for m in labels)])
    lines.append(["decoding step, wall (ms)", *(f"{entries[m]['wall_step_ms']:.3f}" for m in labels)])
    lines.append(["host share of the wall time", *(f"{entries[m]['host_share']:.0%}" for m in labels)])
    mode = "compiled" if entries[labels[0]].get("compiled") else "eager"
    batch = result["profile"]["batch_size"]
    return (f"### {result['profile']['dataset']}: step profile ({mode}, uncaptured, batch {batch})\n\n"
            + _table(header, lines))


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def committed_histogram(rows, method: str = "lookahead") -> Counter:
    """{tokens committed in one step: steps} summed over a method's rows."""
    total: Counter = Counter()
    for row in rows:
        if row["method"] == method:
            total.update({int(k): v for k, v in row.get("accepted_histogram", {}).items()})
    return total


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_formats() -> set[str]:
    """The file suffixes the plots can be saved as (png, pdf, svg, ...): those of matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return set(FigureCanvasAgg.get_supported_filetypes())


def _speedup_bars(axis, labels: list[str], entries: list[dict], title: str, baseline_name: str) -> None:
    speedups = [entry["speedup_vs_greedy"] or 0.0 for entry in entries]
    bars = axis.barh(labels, speedups, color="tab:blue")
    axis.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    for bar, entry in zip(bars, entries):
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  f" {entry['speedup_vs_greedy'] or 0:.2f}x, {entry['tokens_per_step']:.2f} tok/step", va="center")
    axis.invert_yaxis()
    axis.set_xlabel(f"speedup vs {baseline_name} (tokens/s ratio)")
    axis.set_xlim(0, max(speedups + [1.0]) * 1.6)
    axis.set_title(title)


def _subtitle(result: dict) -> str:
    env = result["environment"]
    return f"{Path(env['model']).name}, {env['dtype']}, {env['device_name']} ({env['threads']} threads)"


def plot_bench(result: dict, path: str | Path) -> None:
    """Speedup of each method and the lookahead histogram of tokens committed per step."""
    plt = _pyplot()
    (dataset, summary), = result["summary"].items()
    histogram = committed_histogram(result["rows"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    compared_with = baseline(result, next(iter(summary)))
    _speedup_bars(left, list(summary), list(summary.values()), f"{dataset}: speedup vs {compared_with}", compared_with)
    if histogram:
        values = sorted(histogram)
        right.bar(values, [histogram[v] for v in values], color="tab:orange")
        right.set_xticks(values)
        right.set_title("lookahead: tokens committed per step")
    else:
        right.text(0.5, 0.5, "no lookahead run", ha="center", va="center")
        right.set_title("lookahead")
    right.set_xlabel("tokens committed in one step")
    right.set_ylabel("steps")
    figure.suptitle(_subtitle(result), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sweep(result: dict, path: str | Path) -> None:
    """Speedup of every configuration of the sweep, best first."""
    plt = _pyplot()
    (dataset, summary), = result["summary"].items()
    entries = result["sweep"]
    labels = [f"W={e['window']} N={e['ngram']} G={e['guesses']} K={e['candidate_length']} B={e['tree_nodes']}"
              for e in entries]
    figure, axis = plt.subplots(figsize=(9, 1.2 + 0.35 * len(entries)))
    compared_with = baseline(result, next(iter(summary)))
    _speedup_bars(axis, labels, entries, f"{dataset}: lookahead configurations vs {compared_with}", compared_with)
    figure.suptitle(_subtitle(result), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_batched(result: dict, path: str | Path) -> None:
    """Speedup over the reference against batch size: a line per dataset (per dataset and method when several
    methods are compared with the reference)."""
    plt = _pyplot()
    compared = [record for record in result["batched"] if record["method"] != record["reference"]]
    lines = group_by(compared, lambda record: (record["dataset"], record["method"]))
    several_methods = len({method for _, method in lines}) > 1
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for (dataset, method), records in lines.items():
        records = sorted(records, key=lambda record: record["batch_size"])
        speedups = [float("nan") if r["speedup"] is None else r["speedup"] for r in records]
        axis.plot([r["batch_size"] for r in records], speedups, marker="o",
                  label=f"{dataset}, {method}" if several_methods else dataset)
    sizes = sorted({record["batch_size"] for record in result["batched"]})
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(size) for size in sizes])
    axis.minorticks_off()
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("batch size (rows decoded side by side)")
    axis.set_ylabel(f"speedup vs {result['batched'][0]['reference']} (tokens/s ratio)")
    if lines:
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no method besides the reference", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(_subtitle(result), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def prompt_speedups(result: dict, method: str = "lookahead") -> list[float]:
    """Per prompt: `method`'s tokens/s over the reference's (the run's first method) on the same prompt."""
    rows = result["rows"]
    reference = rows[0]["method"]
    base = {row["prompt_index"]: row["tokens_per_second"] for row in rows if row["method"] == reference}
    return [row["tokens_per_second"] / base[row["prompt_index"]] for row in rows
            if row["method"] == method and base.get(row["prompt_index"])]


def plot_prompt_speedups(runs: dict[str, dict], path: str | Path, method: str = "lookahead") -> None:
    """The distribution of per-prompt speedups of `method`, one box (and the points) per labelled run."""
    plt = _pyplot()
    labels = list(runs)
    values = [prompt_speedups(runs[label], method) for label in labels]
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.2))
    axis.boxplot(values, showfliers=False)
    for i, speedups in enumerate(values, start=1):
        axis.scatter([i + 0.12 * ((j % 5) - 2) / 2 for j in range(len(speedups))], speedups, s=9, alpha=0.6)
        slower = sum(s < 1 for s in speedups)
        axis.annotate(f"{slower}/{len(speedups)} slower", (i, min(speedups)), xytext=(0, -14),
                      textcoords="offset points", ha="center", fontsize=7)
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    axis.set_ylabel(f"{method} speedup per prompt")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
