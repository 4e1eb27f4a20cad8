"""config="auto": the step shapes for this device, model and dtype, chosen by measuring what each step costs.

A plan holds the plain one-token step, a narrow step that only verifies a small token tree and a wide lookahead
step (Jacobi window + tree), cheapest first; `shape_choice.ShapeChooser` picks one of them before every
step. Calibration times each candidate shape on the runner decoding will use, then keeps the wide shape with the
most expected tokens per millisecond (`shape_choice.expected_tokens` grows with the step's rows) and the widest
narrow step that costs little more than the cheapest one, if it is clearly cheaper than the wide step. Results
are cached per model, device, dtype and library version in the user's cache directory; a missing, stale or
unreadable cache file means "calibrate again", never an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import AUTOREGRESSIVE, LookaheadConfig
from .drafting.tree import EMPTY_TREE
from .shape_choice import expected_tokens

CALIBRATION_VERSION = 3
CACHE_FILE = "calibration.json"

# Wide shapes tried, as (W, N, G, tree nodes): the paper's and the reference code's window settings and wider
# ones (algorithm.md), each with the rows of G flat candidates of N-1 tokens as its tree (twice that for the widest).
WIDE_LADDER = ((3, 4, 3, 9), (5, 4, 5, 15), (7, 5, 7, 28), (10, 5, 10, 40), (15, 5, 15, 60), (20, 7, 20, 120))
NARROW_NODES = (4, 8, 16, 32)
# The longest draft a calibrated shape verifies: text copied from the prompt or the output is often longer than an
# n-gram, and depth costs no rows (docs/benchmarks.md, "Token tree").
DRAFT_DEPTH = 12
# A narrow step may cost this much more than the cheapest one; it is meant to be nearly free.
NARROW_COST_SLACK = 1.15
# A narrow step joins the plan only if it costs at most this share of the wide step: one that saves little would
# be chosen over the wide step whenever the pool has candidates and so starve the window of the steps that
# feed the pool (docs/benchmarks.md, "Adaptive steps": where every multi-token step costs about the same, runs
# with such a narrow step committed fewer tokens per step than runs without it).
NARROW_SHARE_OF_WIDE = 0.9
CALIBRATION_PROMPT_TOKENS = 64
WARMUP_STEPS, TIMED_STEPS = 2, 7


@dataclass(frozen=True)
class StepPlan:
    """The step shapes a generation may use, cheapest first, and what one step of each costs here (ms)."""

    shapes: tuple[LookaheadConfig, ...]
    costs_ms: tuple[float, ...]

    def describe(self) -> str:
        return ", ".join(f"{shape_name(s)} {c:.2f} ms" for s, c in zip(self.shapes, self.costs_ms))

    def as_dict(self) -> dict:
        return {"shapes": [asdict(s) for s in self.shapes], "costs_ms": list(self.costs_ms)}

    @classmethod
    def from_dict(cls, data: dict) -> "StepPlan":
        shapes = tuple(LookaheadConfig(**shape) for shape in data["shapes"])
        costs = tuple(float(c) for c in data["costs_ms"])
        if not shapes or len(shapes) != len(costs) or not all(math.isfinite(c) and c > 0 for c in costs):
            raise ValueError("malformed step plan")
        return cls(shapes, costs)


def shape_name(config: LookaheadConfig) -> str:
    if config.guesses == 0 and not config.has_window:
        return "plain"
    if not config.has_window:
        return f"verify B={config.tree_nodes} K={config.candidate_length}"
    return (f"lookahead W={config.window} N={config.ngram} G={config.guesses} K={config.candidate_length} "
            f"B={config.tree_nodes}")


def verify_only(tree_nodes: int, candidate_length: int) -> LookaheadConfig:
    """A step that verifies a tree of `tree_nodes` nodes and runs no window."""
    return LookaheadConfig(window=1, ngram=2, guesses=tree_nodes, candidate_length=candidate_length,
                           tree_nodes=tree_nodes)


# ------------------------------------------------------------------------------------------------- measuring


def time_steps(runner, vocab_size: int) -> list[float]:
    """Milliseconds per step of each of `runner`'s shapes, after a prefill of a fixed prompt; every step verifies
    an empty tree (the cost does not depend on the tokens) and is timed as decoding runs it, host sync included."""
    device = runner.adapter.device
    steps = WARMUP_STEPS + TIMED_STEPS
    room = getattr(runner, "max_length", None)
    length = CALIBRATION_PROMPT_TOKENS if room is None else max(1, min(CALIBRATION_PROMPT_TOKENS, room - steps - 1))
    prompt = torch.arange(length, device=device) % vocab_size
    costs = []
    with torch.inference_mode():
        for shape, layout in enumerate(runner.layouts):
            history = prompt.tolist()
            history.extend(runner.prefill(prompt, history).committed)
            ids = [0] * layout.size
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                history.extend(runner.step(shape, ids, EMPTY_TREE, history).committed)
                times.append(time.perf_counter() - start)
            costs.append(statistics.median(times[WARMUP_STEPS:]) * 1e3)  # the median: robust to a busy machine
    return costs


@dataclass(frozen=True)
class Calibration:
    """Every shape measured (with its cost in ms) and the plan chosen from them."""

    measured: tuple[tuple[LookaheadConfig, float], ...]
    plan: StepPlan


def calibrate(make_runner: Callable[[Sequence[LookaheadConfig]], object], vocab_size: int) -> Calibration:
    """Measure the candidate shapes on runners from `make_runner(shapes)` and choose the plan."""
    wide = [LookaheadConfig(w, n, g, candidate_length=DRAFT_DEPTH, tree_nodes=b) for w, n, g, b in WIDE_LADDER]
    plain_cost = time_steps(make_runner([AUTOREGRESSIVE]), vocab_size)[0]
    wide_costs = [time_steps(make_runner([shape]), vocab_size)[0] for shape in wide]
    best = max(range(len(wide)), key=lambda i: expected_tokens(wide[i]) / wide_costs[i])
    chosen_wide, wide_cost = wide[best], wide_costs[best]
    narrow = [verify_only(nodes, DRAFT_DEPTH) for nodes in NARROW_NODES]
    narrow_costs = time_steps(make_runner(narrow), vocab_size)
    affordable = [i for i, cost in enumerate(narrow_costs) if cost <= NARROW_COST_SLACK * min(narrow_costs)]
    pick = affordable[-1]
    shapes, costs = [AUTOREGRESSIVE], [plain_cost]
    if narrow_costs[pick] <= NARROW_SHARE_OF_WIDE * wide_cost:
        shapes.append(narrow[pick])
        costs.append(narrow_costs[pick])
    shapes.append(chosen_wide)
    costs.append(wide_cost)
    measured = tuple(zip([AUTOREGRESSIVE, *wide, *narrow], [plain_cost, *wide_costs, *narrow_costs]))
    return Calibration(measured, StepPlan(tuple(shapes), tuple(costs)))


# ------------------------------------------------------------------------------------------------- the cache


def cache_path() -> Path:
    """The calibration file: $LOOKAHEAD_CACHE_DIR, else the user's cache directory (platformdirs)."""
    import platformdirs

    directory = os.environ.get("LOOKAHEAD_CACHE_DIR") or platformdirs.user_cache_dir("lookahead-decoding")
    return Path(directory) / CACHE_FILE


def calibration_key(model, engine: str) -> str:
    """What a plan depends on: the model (name and architecture), the device, the dtype, the engine, the versions."""
    import transformers

    device = model.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    architecture = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    parts = [getattr(model, "name_or_path", "") or type(model).__name__, architecture, device_name,
             str(model.dtype), engine, f"torch {torch.__version__}", f"transformers {transformers.__version__}",
             f"calibration {CALIBRATION_VERSION}"]
    return " | ".join(parts)


def read_cache(path: Path) -> dict:
    """The cache file's entries; {} for a missing, unreadable or foreign file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION or not isinstance(data.get("plans"), dict):
        return {}
    return data["plans"]


def cached_plan(key: str, path: Path | None = None) -> StepPlan | None:
    entry = read_cache(path or cache_path()).get(key)
    try:
        return StepPlan.from_dict(entry) if isinstance(entry, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def store_plan(key: str, plan: StepPlan, path: Path | None = None) -> None:
    """Add the plan to the cache file; a cache that cannot be written only costs a calibration next time."""
    path = path or cache_path()
    plans = read_cache(path)
    plans[key] = plan.as_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"version": CALIBRATION_VERSION, "plans": plans}, indent=1), encoding="utf-8")
        temporary.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as err:
        warnings.warn(f"could not write the calibration cache {path}: {err}", RuntimeWarning, stacklevel=2)
