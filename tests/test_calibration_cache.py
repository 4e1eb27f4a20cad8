"""The calibration behind config="auto": its cache file survives concurrent writers, bad entries and failed
writes, a plan measured on a busy machine is measured again, and calibration shows its progress and skips what
clearly loses."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import greedy_reference, tiny_model

import lookahead_decoding as ld
from lookahead_decoding import plan_cache, runners, tuning
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.tuning import Calibration, StepPlan, verify_only

PLAN = StepPlan((AUTOREGRESSIVE, verify_only(4, 12), ld.LookaheadConfig(3, 4, 3, candidate_length=12, tree_nodes=9)),
                (1.0, 1.1, 1.6))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty calibration cache, in this process (plans kept in memory, what drifted) and on disk."""
    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(tmp_path))
    runners._plans.clear()
    monkeypatch.setattr(plan_cache, "_drift_checked", {})
    monkeypatch.setattr(plan_cache, "_stale_keys", set())
    monkeypatch.setattr(plan_cache, "_remeasured_keys", set())
    return tmp_path


@pytest.fixture
def calibrations(monkeypatch):
    """Calibration replaced by an instant one that returns PLAN; the list of calls."""
    calls = []

    def calibrate_model(*args, **kwargs):
        calls.append(args)
        return Calibration(tuple(zip(PLAN.shapes, PLAN.costs_ms)), PLAN)

    monkeypatch.setattr(runners, "calibrate_model", calibrate_model)
    return calls


def warning_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name.startswith("lookahead_decoding") and record.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------ concurrent writers


WRITER = textwrap.dedent("""
    import sys
    from lookahead_decoding import plan_cache
    from lookahead_decoding.tuning import StepPlan
    from lookahead_decoding.config import AUTOREGRESSIVE
    for entry in range(int(sys.argv[2])):
        plan_cache.store_plan(f"writer {sys.argv[1]} entry {entry}", StepPlan((AUTOREGRESSIVE,), (1.0 + entry,)))
""")


def test_concurrent_writers_keep_every_entry(tmp_path):
    writers, entries = 4, 25
    env = {**os.environ, "LOOKAHEAD_CACHE_DIR": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(writer), str(entries)], env=env,
                                  stderr=subprocess.PIPE, text=True) for writer in range(writers)]
    errors = [process.communicate()[1] for process in processes]
    assert all(process.returncode == 0 for process in processes), errors
    assert errors == [""] * writers
    plans = json.loads((tmp_path / plan_cache.CACHE_FILE).read_text())["plans"]
    assert set(plans) == {f"writer {w} entry {e}" for w in range(writers) for e in range(entries)}
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------ bad entries


def fitting(**shape) -> dict:
    return {"window": 3, "ngram": 4, "guesses": 3, **shape}


PLAIN = {"window": 1, "ngram": 2, "guesses": 0, "pool_from_prompt": False}


@pytest.mark.parametrize("entry, reason", [
    ({"shapes": [PLAIN, fitting(window=4000)], "costs_ms": [1.0, 2.0]}, "context"),  # runs nowhere
    ({"shapes": [PLAIN, fitting(window=80)], "costs_ms": [1.0, 2.0]}, "wider"),  # fits, but calibration never tries it
    ({"shapes": [fitting()], "costs_ms": [1.0]}, "plain"),  # no plain step to fall back to
    ({"shapes": [PLAIN, fitting()], "costs_ms": [1.0, float("inf")]}, "cost"),
    ({"shapes": [PLAIN, fitting()], "costs_ms": [1.0, float("nan")]}, "cost"),
    ({"shapes": [PLAIN, fitting()], "costs_ms": [1.0, 0.0]}, "cost"),
    ({"shapes": [PLAIN, fitting()], "costs_ms": [1.0]}, "cost"),
    ({"shapes": [PLAIN, fitting(window=-1)], "costs_ms": [1.0, 2.0]}, "window"),
    ({"shapes": [PLAIN, fitting(colour="red")], "costs_ms": [1.0, 2.0]}, "colour"),
    ({"costs_ms": [1.0]}, "shapes"),
    ("a string", "not"),
])
def test_a_bad_cached_plan_is_dropped_with_one_warning_line_and_measured_again(cache_dir, calibrations, caplog,
                                                                                  entry, reason):
    model = tiny_model("llama")  # context 256
    key = plan_cache.calibration_key(model, "dynamic")
    path = cache_dir / plan_cache.CACHE_FILE
    path.write_text(json.dumps({"version": plan_cache.CALIBRATION_VERSION, "plans": {key: entry, "other": PLAN.as_dict()}}))
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7]])
    out = ld.generate(model, prompt, 12)  # the user passed no shape: nothing may be refused
    assert out.sequences.tolist() == greedy_reference(model, prompt, 12).tolist()
    assert out.plan == PLAN and len(calibrations) == 1
    (line,) = warning_lines(caplog)
    assert "\n" not in line and str(path) in line and reason in line and "measuring" in line
    stored = json.loads(path.read_text())["plans"]
    assert StepPlan.from_dict(stored[key]) == PLAN and StepPlan.from_dict(stored["other"]) == PLAN


def test_a_good_cached_plan_is_used_without_a_word(cache_dir, calibrations, caplog):
    model = tiny_model("llama")
    plan_cache.store_plan(plan_cache.calibration_key(model, "dynamic"), PLAN)
    assert runners.auto_plan(model) == PLAN
    assert not calibrations and not warning_lines(caplog)


# ------------------------------------------------------------------------------------------ drift


def test_a_plan_measured_on_a_busy_machine_is_measured_again_once(cache_dir, calibrations, caplog):
    model = tiny_model("llama")
    key = plan_cache.calibration_key(model, "dynamic")
    path = cache_dir / plan_cache.CACHE_FILE
    # Costs far above what a tiny model's step takes, plain steps cheapest by far: plain steps run, each in
    # about a millisecond.
    busy = StepPlan(PLAN.shapes, (1000.0, 3000.0, 6000.0))
    plan_cache.store_plan(key, busy)
    prompt = torch.tensor([[1, 2, 3]])
    assert ld.generate(model, prompt, 40).plan == busy
    assert not calibrations
    (line,) = warning_lines(caplog)
    assert "\n" not in line and "plain" in line and "measuring" in line
    assert ld.generate(model, prompt, 5).plan == PLAN  # this process measures again
    assert len(calibrations) == 1
    assert StepPlan.from_dict(json.loads(path.read_text())["plans"][key]) == PLAN
    runners._plans.clear()  # the next process reads the file: the re-measured plan, kept
    assert runners.auto_plan(model) == PLAN and len(calibrations) == 1


def test_a_remeasured_plan_is_not_dropped_again(cache_dir, monkeypatch):
    """Steps that still run far faster than a fresh calibration measured are not the load at calibration time
    (compiled steps, say): measuring on every call would only say the same again."""
    model = tiny_model("llama")
    busy = StepPlan(PLAN.shapes, (1000.0, 3000.0, 6000.0))
    calls = []
    monkeypatch.setattr(runners, "calibrate_model", lambda *a, **k: calls.append(a) or Calibration((), busy))
    plan_cache.store_plan(plan_cache.calibration_key(model, "dynamic"), busy)
    prompt = torch.tensor([[1, 2, 3]])
    for _ in range(3):
        assert ld.generate(model, prompt, 40).plan == busy
    runners._plans.clear()  # a new process
    ld.generate(model, prompt, 40)
    assert runners.auto_plan(model) == busy and len(calls) == 1


def test_steps_slower_than_calibrated_keep_the_plan(cache_dir, calibrations):
    """Host work and a machine busy now only make steps slower; that is no reason to measure again."""
    model = tiny_model("llama")
    plan_cache.store_plan(plan_cache.calibration_key(model, "dynamic"), StepPlan(PLAN.shapes, (1e-3, 2e-3, 3e-3)))
    prompt = torch.tensor([[1, 2, 3]])
    ld.generate(model, prompt, 40)
    ld.generate(model, prompt, 5)
    assert not calibrations


def test_a_shape_whose_recent_times_have_all_expired_tells_nothing_of_drift(cache_dir):
    """A batch's shape that ran many steps early on and none in its last 200 has no recent times left."""
    key = "key"
    plan_cache.store_plan(key, PLAN)
    plan_cache._drift_checked[PLAN] = (key, cache_dir / plan_cache.CACHE_FILE)
    plan_cache.check_drift(PLAN, PLAN.costs_ms, [300, 40, 0], [[1e-3] * 15, [], []])  # plain ran far faster than calibrated
    assert plan_cache.is_stale(key)
    plan_cache._drift_checked[PLAN] = (key, cache_dir / plan_cache.CACHE_FILE)
    plan_cache._stale_keys.clear()
    plan_cache.check_drift(PLAN, PLAN.costs_ms, [300, 40, 0], [[], [], []])
    assert not plan_cache.is_stale(key)


# ------------------------------------------------------------------------------------------ failed writes


def test_a_failed_write_leaves_no_temporary_file_and_warns_in_one_line(cache_dir, caplog):
    (cache_dir / plan_cache.CACHE_FILE).mkdir()  # the cache file's name is taken by a folder
    (cache_dir / "calibration.4242.tmp").write_text("{")  # left by an earlier run
    for _ in range(2):
        plan_cache.store_plan("key", PLAN)
    assert sorted(path.name for path in cache_dir.iterdir() if not path.name.endswith(".lock")) == [plan_cache.CACHE_FILE]
    lines = warning_lines(caplog)
    assert len(lines) == 2 and all("\n" not in line and "LOOKAHEAD_CACHE_DIR" in line for line in lines)


def test_an_unwritable_cache_prints_one_line_on_stderr(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    script = ("from lookahead_decoding import plan_cache, tuning; from lookahead_decoding.config import AUTOREGRESSIVE; "
              "plan_cache.store_plan('key', tuning.StepPlan((AUTOREGRESSIVE,), (1.0,)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "LOOKAHEAD_CACHE_DIR": str(blocker / "cache")})
    assert result.returncode == 0 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("lookahead: could not write the calibration cache") and "LOOKAHEAD_CACHE_DIR" in line


# ------------------------------------------------------------------------------------------ calibration time


class FakeRunner:
    """A runner whose steps take no time but advance `clock` by `cost_ms(rows of the batched step)`, times
    `clock.sampled_factor` while its rows sample with top-k or top-p, `clock.unsorted_factor` while they sample
    without."""

    def __init__(self, shapes, clock, cost_ms, batch_size, device, context_length, pipelined=False):
        self.layouts = tuple(SimpleNamespace(config=shape, size=shape.tokens_per_step) for shape in shapes)
        self.adapter = SimpleNamespace(device=torch.device(device), context_length=context_length)
        self.batch_size, self.clock, self.cost_ms, self.pipelined = batch_size, clock, cost_ms, pipelined
        self.factor = 1.0

    def prefill_rows(self, prompts, sampling=None):
        sampled = [params for params in (sampling or {}).values() if params is not None and params.samples]
        sorts = any(params.top_k or params.top_p < 1 for params in sampled)
        self.factor = self.clock.sampled_factor if sorts else self.clock.unsorted_factor if sampled else 1.0
        return {row: SimpleNamespace(committed=[0]) for row in prompts}

    def step(self, shape, ids, tree, history):
        self.clock.steps += 1
        self.clock.now += self.factor * self.cost_ms(self.layouts[shape].size * self.batch_size) / 1e3
        return SimpleNamespace(committed=[0])


def fake_calibration(monkeypatch, cost_ms, batch_size=1, device="cpu", context_length=None, pipelined=False,
                     sampled_factor=1.0, unsorted_factor=1.0, **kwargs):
    """Calibrate on fake runners with a fake clock; (the calibration, steps it ran, shapes it measured)."""
    clock = SimpleNamespace(now=0.0, steps=0, shapes=[], sampled_factor=sampled_factor,
                            unsorted_factor=unsorted_factor)
    monkeypatch.setattr(tuning, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def make_runner(shapes):
        clock.shapes.extend(shapes)
        return FakeRunner(shapes, clock, cost_ms, batch_size, device, context_length, pipelined)

    calibration = tuning.calibrate(make_runner, 96, **kwargs)
    return calibration, clock.steps, clock.shapes


def cpu_like(rows):  # every row costs arithmetic
    return 50.0 + 2.0 * rows


def test_calibration_shows_its_progress_on_stderr(monkeypatch, capsys):
    fake_calibration(monkeypatch, cpu_like, batch_size=4)
    err = capsys.readouterr().err
    assert "calibrating step shapes for batch 4" in err and "shape" in err
    assert "lookahead W=3 N=4 G=3" in err  # what is measured
    assert "0/7" in err  # how many shapes are left: plain, the 2 wide shapes a CPU batch tries, 4 narrow ones


def test_calibration_skips_what_clearly_loses_and_chooses_the_same(monkeypatch):
    exhaustive, all_steps, all_shapes = fake_calibration(monkeypatch, cpu_like, exhaustive=True)
    quick, steps, shapes = fake_calibration(monkeypatch, cpu_like)
    assert quick.plan.shapes == exhaustive.plan.shapes
    assert quick.plan.costs_ms == pytest.approx(exhaustive.plan.costs_ms)
    assert steps < 0.6 * all_steps and len(shapes) < len(all_shapes)


def test_a_batch_on_a_cpu_tries_a_shorter_ladder(monkeypatch):
    flat = lambda rows: 10.0  # noqa: E731  launch-bound: the widest shape would win
    _, _, batch_shapes = fake_calibration(monkeypatch, flat, batch_size=4)
    _, _, one_row_shapes = fake_calibration(monkeypatch, flat, batch_size=1)
    assert max(shape.tokens_per_step for shape in one_row_shapes) == tuning.WIDEST_ROWS
    assert max(shape.tokens_per_step for shape in batch_shapes) < tuning.WIDEST_ROWS


def test_a_short_context_tries_only_the_shapes_it_has_room_for(monkeypatch):
    flat = lambda rows: 10.0  # noqa: E731  the widest shape would win
    calibration, _, shapes = fake_calibration(monkeypatch, flat, context_length=100)
    assert max(shape.tokens_per_step for shape in shapes) < 100
    calibration.plan.check_calibrated(100)  # what it chose is a plan the cache accepts on load


@pytest.mark.parametrize(("cost_ms", "chosen"), [
    (lambda rows: 10.0, 63),  # launch-bound: the largest tree costs no more and commits the most
    (lambda rows: 10.0 if rows <= 128 else 20.0, 31),
    (lambda rows: 5.0 + 0.1 * rows, 15),  # every row costs: the smallest tree commits the most per ms
])
def test_a_runner_that_pipelines_gets_the_plain_step_and_the_device_drafting_tree_with_most_tokens_per_ms(
        monkeypatch, cost_ms, chosen):
    calibration, _, shapes = fake_calibration(monkeypatch, cost_ms, batch_size=4, pipelined=True)
    trees = [tuning.device_drafting(nodes) for nodes in tuning.DEVICE_TREES]
    assert shapes == [AUTOREGRESSIVE, *trees]  # measured: plain, then every tree, none of the host's shapes
    assert calibration.plan.shapes == (AUTOREGRESSIVE, tuning.device_drafting(chosen))
    rows = 4 * (1 + chosen)
    assert calibration.plan.costs_ms == pytest.approx((cost_ms(4), cost_ms(rows)))
    calibration.plan.check_calibrated(None)  # a plan the cache accepts on load


def test_a_short_context_keeps_the_device_drafting_trees_it_has_room_for(monkeypatch):
    calibration, _, shapes = fake_calibration(monkeypatch, lambda rows: 10.0, pipelined=True,
                                              context_length=40)
    assert shapes == [AUTOREGRESSIVE, tuning.device_drafting(15), tuning.device_drafting(31)]
    assert calibration.plan.shapes == (AUTOREGRESSIVE, tuning.device_drafting(31))


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_runner_built_to_sample_chooses_by_sampled_steps_and_times_its_shapes_greedy_and_unsorted_too(
        monkeypatch, pipelined):
    sampling = ld.SamplingParams(temperature=0.7, top_p=0.9)
    greedy, _, _ = fake_calibration(monkeypatch, cpu_like, batch_size=4, pipelined=pipelined)
    sampled, _, shapes = fake_calibration(monkeypatch, cpu_like, batch_size=4, pipelined=pipelined,
                                          sampled_factor=3.0, unsorted_factor=2.0, sampling=sampling)
    assert greedy.plan.greedy_costs_ms is None
    assert sampled.plan.shapes == greedy.plan.shapes  # every shape costs 3x: the same choice
    assert sampled.plan.costs_ms == pytest.approx([3 * cost for cost in greedy.plan.costs_ms])
    assert sampled.plan.greedy_costs_ms == pytest.approx(greedy.plan.costs_ms)
    assert shapes[-len(sampled.plan.shapes):] == list(sampled.plan.shapes)  # timed again, greedily
    assert sampled.plan.unsorted_costs_ms == pytest.approx([2 * cost for cost in greedy.plan.costs_ms])
    assert sampled.plan.costs_for(("sampling", "top_k_top_p")) == sampled.plan.costs_ms
    assert sampled.plan.costs_for(("penalties", "sampling", "min_p")) == sampled.plan.unsorted_costs_ms
    assert sampled.plan.costs_for(()) == sampled.plan.greedy_costs_ms
    assert StepPlan.from_dict(json.loads(json.dumps(sampled.plan.as_dict()))) == sampled.plan
    kept = sampled.plan.keeping([0])
    assert (kept.costs_ms, kept.greedy_costs_ms, kept.unsorted_costs_ms) == (
        sampled.plan.costs_ms[:1], sampled.plan.greedy_costs_ms[:1], sampled.plan.unsorted_costs_ms[:1])


def test_a_plan_needs_one_greedy_and_one_unsorted_cost_per_shape():
    with pytest.raises(ValueError, match="a plan needs one greedy cost per shape, got 3 shapes and 2 greedy costs"):
        StepPlan(PLAN.shapes, PLAN.costs_ms, (1.0, 1.0))
    with pytest.raises(ValueError, match="a plan needs one unsorted cost per shape, got 3 shapes and 4 unsorted costs"):
        StepPlan(PLAN.shapes, PLAN.costs_ms, None, (1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="step costs must be positive and finite"):
        StepPlan(PLAN.shapes, PLAN.costs_ms, (1.0, 1.0, -1.0))
