"""config="auto": the step shapes for this device, model and dtype, chosen by measuring what each step costs.

On a runner that pipelines its steps (the static engine on CUDA), a plan holds the plain one-token step and a step
that drafts on the device (`device_drafts.py`): such a step costs the host nothing, can be launched before the one
before it is read, and there it commits more tokens per millisecond than the host's drafts at every batch size
measured (docs/benchmarks.md, "H200, eighth session"). Calibration times a few tree sizes and keeps the one with
the most tokens per millisecond by the tokens per step measured with each (`DEVICE_TREES`).

Elsewhere a plan holds the plain one-token step, a narrow step that only verifies a small token tree and a wide
lookahead step (Jacobi window + tree), cheapest first. Calibration times each candidate shape on the runner
decoding will use, then keeps the wide shape with the most expected tokens per millisecond
(`shape_choice.expected_tokens` grows with the step's rows) and the widest narrow step that costs little more than
the cheapest one, if it is clearly cheaper than the wide step. Timing a shape stops early once it clearly loses, and
the ladder stops where wider shapes cannot win.

Either way `shape_choice.ShapeChooser` picks one of the plan's shapes before every step.

Plans are cached by `plan_cache.py`.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from .config import AUTOREGRESSIVE, DEVICE_TREE_NODES, DRAFT_DEPTH, LookaheadConfig
from .drafting.tree import EMPTY_TREE
from .sampling_params import SamplingParams
from .shape_choice import expected_tokens

# Wide shapes tried, as (W, N, G, tree nodes): the paper's and the reference code's window settings and wider
# ones (docs/algorithm.md, "The shape ladder"), each with the rows of G flat candidates of N-1 tokens as its tree
# (twice that for the widest).
WIDE_LADDER = ((3, 4, 3, 9), (5, 4, 5, 15), (7, 5, 7, 28), (10, 5, 10, 40), (15, 5, 15, 60), (20, 7, 20, 120))
WIDEST_ROWS = max((n - 1) * w + b for w, n, _, b in WIDE_LADDER)  # no cached plan may hold a wider step
# A batch on a CPU tries the two narrowest: there every row of a step costs arithmetic, and at batch 4 the
# narrowest already cost 3.5 plain steps, so `auto` took plain steps throughout (docs/benchmarks.md, "2-core CPU,
# fp32, 16 prompts per dataset"); wider ones take minutes to time and cannot win.
CPU_BATCH_LADDER = WIDE_LADDER[:2]
NARROW_NODES = (4, 8, 16, 32)
# The longest draft a calibrated shape verifies is config.DRAFT_DEPTH: text copied from the prompt or the output is
# often longer than an n-gram, and depth costs no rows (docs/benchmarks.md, "Token tree").
# A narrow step may cost this much more than the cheapest one; it is meant to be nearly free.
NARROW_COST_SLACK = 1.15
# A narrow step joins the plan only if it costs at most this share of the wide step: one that saves little would
# be chosen over the wide step whenever the pool has candidates and so starve the window of the steps that
# feed the pool (docs/benchmarks.md, "Adaptive steps": where every multi-token step costs about the same, runs
# with such a narrow step committed fewer tokens per step than runs without it).
NARROW_SHARE_OF_WIDE = 0.9
# Steps that draft on the device: their tree sizes, each with the tokens per step it committed on the H200 (bf16,
# SmolLM2-135M, 256 new tokens, on GSM8K, the lowest of the three datasets; 63 nodes at batch 1, 15 and 31 at batch
# 64; docs/benchmarks.md, "H200, eighth session"). What a tree costs grows with the batch, what it commits little.
DEVICE_TREES = {15: 2.8, 31: 3.0, DEVICE_TREE_NODES: 3.6}
CALIBRATION_PROMPT_TOKENS = 64
WARMUP_STEPS, TIMED_STEPS = 2, 7
# Timed steps before a shape may be given up as clearly losing: even its fastest one could not make it win.
MIN_TIMED_STEPS = 3


# The sets of sampling stages (`row_sampler.STAGES`) whose steps a plan may cost apart: no row samples; rows draw
# without sorting the vocabulary; some row sorts it for top-k or top-p (`StepPlan.costs_for`).
COST_TIERS = ((), ("sampling",), ("sampling", "top_k_top_p"))


def cost_tier(stages: Sequence[str]) -> tuple[str, ...]:
    """The tier of COST_TIERS whose costs a step pays whose rows use these sampling stages."""
    if not stages:
        return COST_TIERS[0]
    return COST_TIERS[2] if "top_k_top_p" in stages else COST_TIERS[1]


@dataclass(frozen=True)
class StepPlan:
    """The step shapes a generation may use, cheapest first, and what one step of each costs here (ms).

    A plan for an engine built to sample was timed with sampling rows that filter by top-p (`costs_ms`);
    `greedy_costs_ms` then holds what the same shapes cost when no row samples, penalises or filters, and
    `unsorted_costs_ms` what they cost when rows sample without top-k or top-p (a temperature alone, as most
    clients send). A sampled step draws at every position it computes, and top-k and top-p sort the vocabulary
    there too, which a tree multiplies: at batch 64 the H100 timed a 16-position tree at 19.7 ms sampled, where a
    greedy one costs 7-8 ms (docs/benchmarks.md, "The server with the device's drafts"); at batch 1 a 64-position
    tree costs 4.32 ms greedy, 4.53 at a temperature alone and 5.22 with top-p ("Refills that wait for company").
    Judged by the sampled cost, greedy requests on a server never drafted."""

    shapes: tuple[LookaheadConfig, ...]
    costs_ms: tuple[float, ...]
    greedy_costs_ms: tuple[float, ...] | None = None
    unsorted_costs_ms: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Frozen; tuples, so that plans given as lists compare equal to the same plan given as tuples.
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "costs_ms", tuple(self.costs_ms))
        if not self.shapes or len(self.shapes) != len(self.costs_ms):
            raise ValueError(f"a plan needs one cost per shape, got {len(self.shapes)} shapes and "
                             f"{len(self.costs_ms)} costs")
        for shape in self.shapes:
            if not isinstance(shape, LookaheadConfig):
                raise TypeError(f"a plan's shapes are LookaheadConfigs, got {shape!r}")
        check_costs(self.costs_ms)
        for field, kind in (("greedy_costs_ms", "greedy"), ("unsorted_costs_ms", "unsorted")):
            if getattr(self, field) is not None:
                costs = tuple(getattr(self, field))
                object.__setattr__(self, field, costs)
                if len(costs) != len(self.shapes):
                    raise ValueError(f"a plan needs one {kind} cost per shape, got {len(self.shapes)} shapes and "
                                     f"{len(costs)} {kind} costs")
                check_costs(costs)

    def costs_for(self, stages: Sequence[str]) -> tuple[float, ...]:
        """What each shape costs in steps whose rows use these sampling stages (`row_sampler.STAGES`; none: every
        row greedy), as far as the plan was timed apart for them."""
        tier = cost_tier(stages)
        timed = {COST_TIERS[0]: self.greedy_costs_ms, COST_TIERS[1]: self.unsorted_costs_ms}.get(tier)
        return timed or self.costs_ms

    def keeping(self, indices: Sequence[int]) -> "StepPlan":
        """The plan of the shapes at `indices` alone, with their costs."""
        greedy, unsorted = self.greedy_costs_ms, self.unsorted_costs_ms
        return StepPlan(tuple(self.shapes[i] for i in indices), tuple(self.costs_ms[i] for i in indices),
                        None if greedy is None else tuple(greedy[i] for i in indices),
                        None if unsorted is None else tuple(unsorted[i] for i in indices))

    def describe(self) -> str:
        if len(self.shapes) == 1:  # nothing to choose between: its cost is a placeholder, not a measure
            return f"{shape_name(self.shapes[0])} (one shape)"
        described = ", ".join(f"{shape_name(s)} {c:.2f} ms" for s, c in zip(self.shapes, self.costs_ms))
        for costs, rows in ((self.greedy_costs_ms, "greedy rows only"),
                            (self.unsorted_costs_ms, "rows sampling without top-k or top-p")):
            if costs is not None:
                described += f" ({rows}: {', '.join(f'{c:.2f}' for c in costs)} ms)"
        return described

    def as_dict(self) -> dict:
        data = {"shapes": [asdict(s) for s in self.shapes], "costs_ms": list(self.costs_ms)}
        for field in ("greedy_costs_ms", "unsorted_costs_ms"):
            if getattr(self, field) is not None:
                data[field] = list(getattr(self, field))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "StepPlan":
        """The plan `as_dict` wrote; ValueError or TypeError saying what is wrong with anything else."""
        if not isinstance(data, dict) or not {"shapes", "costs_ms"} <= data.keys():
            raise ValueError("the entry is not an object with shapes and costs_ms")
        greedy, unsorted = data.get("greedy_costs_ms"), data.get("unsorted_costs_ms")
        return cls(tuple(LookaheadConfig(**shape) for shape in data["shapes"]),
                   tuple(float(c) for c in data["costs_ms"]),
                   None if greedy is None else tuple(float(c) for c in greedy),
                   None if unsorted is None else tuple(float(c) for c in unsorted))

    def check_calibrated(self, context_length: int | None) -> None:
        """ValueError unless calibration could have chosen this plan for a model of `context_length` tokens: the
        plain step first (the fallback when nothing else fits) and no shape wider than the ladder's widest."""
        if self.shapes[0] != AUTOREGRESSIVE:
            raise ValueError(f"the plan starts with {shape_name(self.shapes[0])}, not the plain step")
        for shape in self.shapes:
            rows = shape.tokens_per_step
            if context_length is not None and rows >= context_length:
                raise ValueError(f"{shape_name(shape)} has {rows} tokens, no room in the model's context of "
                                 f"{context_length}")
            if rows > WIDEST_ROWS:
                raise ValueError(f"{shape_name(shape)} has {rows} tokens, wider than calibration measures "
                                 f"({WIDEST_ROWS})")



def check_costs(costs_ms: Sequence[float]) -> None:
    if not all(isinstance(cost, (int, float)) and not isinstance(cost, bool) and math.isfinite(cost) and cost > 0
               for cost in costs_ms):
        raise ValueError(f"step costs must be positive and finite (ms), got {list(costs_ms)}")


def shape_name(config: LookaheadConfig) -> str:
    if config.guesses == 0 and not config.has_window:
        return "plain"
    if config.device_drafts:
        window = f" W={config.window} N={config.ngram} G={config.guesses}" if config.has_window else ""
        return f"device drafts{window} B={config.tree_nodes} K={config.candidate_length}"
    if not config.has_window:
        return f"verify B={config.tree_nodes} K={config.candidate_length}"
    return (f"lookahead W={config.window} N={config.ngram} G={config.guesses} K={config.candidate_length} "
            f"B={config.tree_nodes}")


def verify_only(tree_nodes: int, candidate_length: int) -> LookaheadConfig:
    """A step that verifies a tree of `tree_nodes` nodes and runs no window."""
    return LookaheadConfig(window=1, ngram=2, guesses=tree_nodes, candidate_length=candidate_length,
                           tree_nodes=tree_nodes)


# ------------------------------------------------------------------------------------------------- measuring


def time_steps(runner, vocab_size: int, clearly_loses: Callable[[int, list[float], list[float]], bool] | None = None,
               progress: tqdm | None = None, sampling: SamplingParams | None = None) -> list[float]:
    """Milliseconds per step of each of `runner`'s shapes, after a prefill of a fixed prompt; every step verifies
    an empty tree (the cost does not depend on the tokens) and is timed as decoding runs it, host sync included.

    clearly_loses(shape, times, costs): whether a shape's timed steps so far (ms) show that it loses (`costs`:
    of the runner's shapes before it); its timing then stops early. progress: advanced by one per shape.
    sampling: the parameters the sequence is decoded with (None: greedy)."""
    device = runner.adapter.device
    steps = WARMUP_STEPS + TIMED_STEPS
    room = getattr(runner, "max_length", None)
    length = CALIBRATION_PROMPT_TOKENS if room is None else max(1, min(CALIBRATION_PROMPT_TOKENS, room - steps - 1))
    prompt = torch.arange(length, device=device) % vocab_size
    costs: list[float] = []
    with torch.inference_mode():
        for shape, layout in enumerate(runner.layouts):
            if progress is not None:
                progress.set_postfix_str(shape_name(layout.config))
            history = prompt.tolist()
            history.extend(runner.prefill_rows({0: list(history)}, {0: sampling})[0].committed)
            ids = [0] * layout.size
            times: list[float] = []
            for step in range(steps):
                start = time.perf_counter()
                history.extend(runner.step(shape, ids, EMPTY_TREE, history).committed)
                if step >= WARMUP_STEPS:
                    times.append((time.perf_counter() - start) * 1e3)
                if (clearly_loses is not None and len(times) >= MIN_TIMED_STEPS
                        and clearly_loses(shape, times, costs)):
                    break
            costs.append(statistics.median(times))  # the median: robust to a busy machine
            if progress is not None:
                progress.update()
    sampler = getattr(runner, "sampler", None)
    if sampler is not None:  # the timed sequence has ended: later steps need not run its stages
        sampler.end_rows([0])
    return costs


def progress_label(batch_size: int) -> str:
    """What calibration's progress bar says."""
    return "calibrating step shapes" + (f" for batch {batch_size}" if batch_size > 1 else "")


@dataclass(frozen=True)
class Calibration:
    """Every shape measured (with its cost in ms) and the plan chosen from them."""

    measured: tuple[tuple[LookaheadConfig, float], ...]
    plan: StepPlan


def calibrate(make_runner: Callable[[Sequence[LookaheadConfig]], object], vocab_size: int,
              exhaustive: bool = False, sampling: SamplingParams | None = None) -> Calibration:
    """Measure the candidate shapes on runners from `make_runner(shapes)` and choose the plan, with a progress bar
    on stderr. Unless `exhaustive`, shapes that clearly lose are timed in fewer steps or not at all, and a batch
    on a CPU tries a shorter ladder. `sampling`: the parameters the timed steps decode with (None: greedy); the
    plan's shapes are then timed with greedy rows, and with rows sampling at the same temperature alone, too
    (`StepPlan.greedy_costs_ms`, `unsorted_costs_ms`)."""
    calibration = choose_plan(make_runner, vocab_size, exhaustive, sampling)
    if sampling is None:
        return calibration
    runner = make_runner(calibration.plan.shapes)
    greedy_costs = time_steps(runner, vocab_size)
    unsorted_costs = time_steps(runner, vocab_size, sampling=unsorted(sampling))
    return replace(calibration, plan=replace(calibration.plan, greedy_costs_ms=greedy_costs,
                                             unsorted_costs_ms=unsorted_costs))


def unsorted(sampling: SamplingParams) -> SamplingParams:
    """`sampling` without top-k or top-p: what a step costs when its rows need no sort of the vocabulary."""
    return replace(sampling, top_k=0, top_p=1.0)


def choose_plan(make_runner: Callable[[Sequence[LookaheadConfig]], object], vocab_size: int, exhaustive: bool,
                sampling: SamplingParams | None) -> Calibration:
    """`calibrate`'s measuring and choosing, with the rows decoding with `sampling` (None: greedy)."""
    plain_runner = make_runner([AUTOREGRESSIVE])
    if getattr(plain_runner, "pipelined", False):
        return calibrate_device_drafts(make_runner, plain_runner, vocab_size, sampling)
    batch_size = plain_runner.batch_size
    cpu_batch = plain_runner.adapter.device.type == "cpu" and batch_size > 1
    ladder = CPU_BATCH_LADDER if cpu_batch and not exhaustive else WIDE_LADDER
    context = plain_runner.adapter.context_length
    wide = [shape for shape in (LookaheadConfig(w, n, g, candidate_length=DRAFT_DEPTH, tree_nodes=b)
                                for w, n, g, b in ladder)
            if context is None or shape.tokens_per_step < context]  # what `check_calibrated` accepts
    narrow = [verify_only(nodes, DRAFT_DEPTH) for nodes in NARROW_NODES]
    with tqdm(total=1 + len(wide) + len(narrow), desc=progress_label(batch_size), unit="shape", file=sys.stderr,
              leave=False) as progress:
        (plain_cost,) = time_steps(plain_runner, vocab_size, progress=progress, sampling=sampling)
        wide_costs: list[float] = []
        best_rate = 0.0  # expected tokens per ms of the best wide shape so far
        for shape in wide:
            tokens = expected_tokens(shape)
            # Clearly slower: even its fastest step so far would not make it the best.
            slower = None if exhaustive else lambda _, times, __: tokens / min(times) < best_rate
            (cost,) = time_steps(make_runner([shape]), vocab_size, slower, progress, sampling)
            wide_costs.append(cost)
            best_rate = max(best_rate, tokens / cost)
            # A wider shape costs at least as much as this one: if even the widest could not win at this cost,
            # none of the rest can.
            if not exhaustive and expected_tokens(wide[-1]) / cost < best_rate:
                break
        progress.total -= len(wide) - len(wide_costs)
        wide = wide[: len(wide_costs)]
        best = max(range(len(wide)), key=lambda i: expected_tokens(wide[i]) / wide_costs[i])
        chosen_wide, wide_cost = wide[best], wide_costs[best]
        # Clearly unaffordable: even its fastest step costs more than the slack allows over a cheaper narrow step.
        unaffordable = None if exhaustive else lambda _, times, costs: (
            min(times) > NARROW_COST_SLACK * min(costs, default=math.inf))
        narrow_costs = time_steps(make_runner(narrow), vocab_size, unaffordable, progress, sampling)
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


def device_drafting(tree_nodes: int) -> LookaheadConfig:
    """A step that drafts a tree of `tree_nodes` nodes on the device."""
    return LookaheadConfig(1, 2, 1, candidate_length=DRAFT_DEPTH, tree_nodes=tree_nodes, device_drafts=True)


def calibrate_device_drafts(make_runner: Callable[[Sequence[LookaheadConfig]], object], plain_runner,
                            vocab_size: int, sampling: SamplingParams | None) -> Calibration:
    """`calibrate` for a runner that pipelines: the plain step and the device-drafting tree with the most tokens per
    millisecond."""
    context = plain_runner.adapter.context_length
    trees = [device_drafting(nodes) for nodes in DEVICE_TREES
             if context is None or device_drafting(nodes).tokens_per_step < context]
    with tqdm(total=1 + len(trees), desc=progress_label(plain_runner.batch_size), unit="shape", file=sys.stderr,
              leave=False) as progress:
        (plain_cost,) = time_steps(plain_runner, vocab_size, progress=progress, sampling=sampling)
        tree_costs = time_steps(make_runner(trees), vocab_size, None, progress, sampling) if trees else []
    measured = tuple(zip([AUTOREGRESSIVE, *trees], [plain_cost, *tree_costs]))
    if not trees:
        return Calibration(measured, StepPlan((AUTOREGRESSIVE,), (plain_cost,)))
    best = max(range(len(trees)), key=lambda i: DEVICE_TREES[trees[i].tree_nodes] / tree_costs[i])
    return Calibration(measured, StepPlan((AUTOREGRESSIVE, trees[best]), (plain_cost, tree_costs[best])))
