"""Adaptive step shapes: any schedule of shapes is exact, the choice follows costs and acceptance, and the
calibrated plan is cached without ever crashing on a bad cache file."""

import gc
import json
import random
import time
import weakref

import numpy
import pytest
import torch
from conftest import VOCAB, greedy_reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lookahead_decoding as ld
from lookahead_decoding import decoding, plan_cache, runners, scheduler
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.model_adapter import ModelAdapter
from lookahead_decoding.shape_choice import AcceptancePrior, BatchYield, ChooserTable, ShapeChooser, best_shape
from lookahead_decoding.step import EagerStep
from lookahead_decoding.tuning import StepPlan, verify_only

K = 3
SHAPES = (AUTOREGRESSIVE, verify_only(2 * K, K), ld.LookaheadConfig(4, 4, 4), ld.LookaheadConfig(2, 3, 3, candidate_length=K))


def random_schedule(seed: int):
    """A stand-in for `best_shape` that picks a random shape every step, whatever the statistics say."""
    rng = random.Random(seed)
    return lambda rows, extra, later, costs_ms, yields=None: rng.randrange(len(costs_ms))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    arch=st.sampled_from(["llama", "qwen3", "gpt2", "gpt_neox", "phi3", "mistral", "gemma2"]),
    static=st.booleans(),
    seed=st.integers(0, 10**6),
    motif=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5),
    prompt_len=st.integers(1, 18),
    max_new_tokens=st.integers(1, 40),
)
def test_a_random_schedule_of_shapes_equals_greedy(arch, static, seed, motif, prompt_len, max_new_tokens):
    model = tiny_model(arch)
    static = static and ModelAdapter(model).sliding_window is None  # the static engine has no sliding windows
    prompt = torch.tensor([(motif * 20)[:prompt_len]])
    runner = StaticStep(model, SHAPES, 64) if static else EagerStep(ModelAdapter(model), SHAPES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scheduler, "best_shape", random_schedule(seed))
        out = ld.generate(model, prompt, max_new_tokens, StepPlan(SHAPES, (1.0,) * len(SHAPES)), runner=runner)
    assert out.sequences.tolist() == greedy_reference(model, prompt, max_new_tokens).tolist()
    assert sum(out.stats.shape_steps.values()) == out.stats.steps


def chooser(window_probes=0, **prior):
    # plain 1 ms, verify-only 1.1 ms, wide lookahead 1.6 ms; by default choosing by the estimates alone, without
    # the window steps a sequence first runs to measure the window
    return ShapeChooser(SHAPES[:3], (1.0, 1.1, 1.6), AcceptancePrior(**prior), window_probes=window_probes)


def test_a_sequence_runs_the_window_before_its_prior_may_rule_it_out():
    """The prior says the window commits 1 token per step at 1.6x a plain step's cost: a sequence alone still
    runs it twice, and keeps it if it commits enough on this text."""
    for committed, then in ((1, 0), (4, 2)):
        pick = chooser(window_probes=2, accepted=0.0, window_tokens=1.0)
        for _ in range(2):
            assert pick.choose(num_nodes=0) == 2
            pick.observe(2, num_nodes=0, path=list(range(committed - 1)))
        # window estimate 0.64 * 1 + 0.36 * committed: 1 token for 1.6 ms, or 2.08 tokens for 1.6 ms
        assert pick.choose(num_nodes=0) == then
    table = ChooserTable(SHAPES[:3], (1.0, 1.1, 1.6), len(ROWS), AcceptancePrior(accepted=0.0, window_tokens=1.0))
    assert table.later(ROWS).tolist() == [[0.0, 0.0, 0.0]] * 8  # a batch does not probe: its rows' prior decides


def test_plain_steps_when_nothing_pays():
    pick = chooser(accepted=0.0, window_tokens=1.0)
    assert pick.choose(num_nodes=0) == 0
    assert pick.choose(num_nodes=5) == 0


def test_the_window_runs_while_it_pays_and_is_retried_later():
    pick = chooser(accepted=0.0)  # optimistic prior: 3 tokens per window step, 3 / 1.6 beats 1 / 1
    assert pick.choose(num_nodes=0) == 2
    for _ in range(30):  # window steps that commit one token each
        pick.observe(2, num_nodes=0, path=[])
    assert pick.window_tokens[2] < 1.1
    assert pick.choose(num_nodes=0) == 0
    steps = 0
    while pick.choose(num_nodes=0) == 0:  # plain steps: the window's estimate drifts back to the prior
        pick.observe(0, num_nodes=0, path=[])
        steps += 1
    assert 10 < steps < 100


def test_cheap_verification_when_candidates_get_accepted():
    pick = chooser(accepted=0.0, window_tokens=1.0)
    for _ in range(20):  # the wide step verified a tree; its best-ranked branch was accepted for 3 tokens
        pick.observe(2, num_nodes=4, path=[0, 1, 2])
    assert pick.in_run  # the last verification accepted something
    assert pick.accepted[True][1] == pytest.approx(3, abs=0.5)  # the narrow step learnt it would have accepted as much
    assert pick.choose(num_nodes=4) == 1  # (1 + 3) / 1.1 beats what the wide step commits per ms
    assert pick.choose(num_nodes=0) == 2  # nothing to verify, and the window step commits 4 tokens


def test_acceptance_is_estimated_apart_after_hits_and_after_misses():
    pick = ShapeChooser(SHAPES[:2], (1.0, 1.8), AcceptancePrior(accepted=0.0))  # plain, verify-only
    for _ in range(10):  # runs: a hit mostly follows a hit, a miss a miss
        for accepted in (3,) * 6 + (0,) * 6:
            pick.observe(1, num_nodes=2, path=list(range(accepted)))
    assert pick.accepted[True][1] > 2 and pick.accepted[False][1] < 1
    pick.observe(1, num_nodes=2, path=[0, 1, 2])
    assert pick.choose(num_nodes=2) == 1  # in a run of hits: verify
    pick.observe(1, num_nodes=2, path=[])
    assert pick.choose(num_nodes=2) == 0  # after a miss: plain


def test_a_device_drafting_step_keeps_one_slow_mean_and_is_retried_after_plain_steps():
    device = ld.LookaheadConfig(1, 2, 1, candidate_length=K, tree_nodes=15, device_drafts=True)
    pick = ShapeChooser((AUTOREGRESSIVE, device), (1.0, 1.6))  # the prior (1 accepted per step) pays for it
    assert pick.choose(num_nodes=0) == 1
    pick.observe(1, num_nodes=15, path=[])
    assert pick.choose(num_nodes=0) == 1  # one miss is not enough to give it up
    misses = 1
    while pick.choose(num_nodes=0) == 1:
        pick.observe(1, num_nodes=15, path=[])
        misses += 1
    assert 10 < misses < 30 and pick.accepted[False][1] == pick.accepted[True][1]  # one mean, hit or miss
    chosen = []
    for _ in range(300):  # it finds nothing: while plain steps run its estimate drifts back, and it is retried
        chosen.append(pick.choose(num_nodes=0))
        pick.observe(chosen[-1], num_nodes=15 if chosen[-1] else 0, path=[])
    assert 0.03 < sum(chosen) / len(chosen) < 0.25
    for _ in range(50):
        pick.observe(1, num_nodes=15, path=[0, 1])
    assert pick.accepted[False][1] == pytest.approx(2, abs=0.5)


def test_a_narrow_step_learns_nothing_from_a_path_outside_its_budget():
    pick = chooser(accepted=0.0)
    for _ in range(20):
        pick.observe(2, num_nodes=12, path=[6, 7, 8])  # a path beyond the narrow step's 2·K = 6 nodes
    assert pick.accepted[True][1] == pytest.approx(0)
    assert pick.window_tokens[2] == pytest.approx(4, abs=0.5)


ROWS = numpy.arange(8)


def batch_table(**prior) -> ChooserTable:
    """The statistics of 8 rows, with `chooser`'s shapes and calibrated costs."""
    return ChooserTable(SHAPES[:3], (1.0, 1.1, 1.6), len(ROWS), AcceptancePrior(**prior))


def choose(table: ChooserTable, extra, costs_ms, yields) -> int:
    """The scheduler's choice for a step of all 8 rows."""
    return best_shape(len(ROWS), extra, table.later(ROWS).sum(axis=0), costs_ms, yields)


def test_a_batch_corrects_what_its_rows_overestimate():
    """Rows that all expect 2 tokens from a verify step that delivers 1.25: summed over 8 rows, the verify step
    looks better than plain until the batch's yield ratio says what it delivers beyond one token per row;
    unchosen, the ratio recovers."""
    table = batch_table(accepted=1.0, window_tokens=1.0)
    batch_yield = BatchYield(3)
    extra = table.batch_extra(ROWS, [4] * 8)
    assert choose(table, extra, (1.0, 1.4, 2.0), batch_yield.ratios) == 1  # 16 / 1.4 > 8 / 1
    assert extra[1] == pytest.approx(8.0)
    for _ in range(20):
        batch_yield.observe(1, expected_extra=8.0, committed_extra=2)
    assert batch_yield.ratios[1] == pytest.approx(2 / 8, abs=0.05)
    assert choose(table, extra, (1.0, 1.4, 2.0), batch_yield.ratios) == 0  # 10 / 1.4 < 8 / 1
    steps = 0
    while choose(table, extra, (1.0, 1.4, 2.0), batch_yield.ratios) == 0:
        batch_yield.observe(0, expected_extra=0.0, committed_extra=0)
        steps += 1
    assert 5 < steps < 60  # tried again later


def test_a_batch_scales_what_its_rows_expect_now_and_adds_the_window_later_value():
    """A window step's later value is not delivered by the step itself: comparing it with what the step committed
    would shrink the window's yield ratio every time the window earns that value."""
    table = batch_table(accepted=0.0, window_tokens=2.0)
    table.window_credit[:] = table.window_rate[:] = 0.25  # one token later per window step
    first = ROWS[:1]
    assert 1 + table.batch_extra(first, [0])[2] + table.later(first)[0, 2] == pytest.approx(3.0)  # now and later
    assert table.batch_extra(ROWS, [0] * 8)[2] == pytest.approx(8.0)  # now, beyond one per row
    batch_yield = BatchYield(3)
    batch_yield.observe(2, expected_extra=8.0, committed_extra=8)  # the window delivered what it promised now
    assert batch_yield.ratios[2] == pytest.approx(1.0)
    # 8 rows + 8 now + 8 later = 24 tokens for 2.9 ms beats 8 for 1 ms; without the later value 16 / 2.9 would not.
    assert choose(table, table.batch_extra(ROWS, [0] * 8), (1.0, 1.4, 2.9), batch_yield.ratios) == 2
    batch_yield.observe(2, expected_extra=8.0, committed_extra=0)  # the window committed nothing beyond one per row
    assert batch_yield.ratios[2] == pytest.approx(0.8)


def test_rows_without_lookahead_take_the_cheapest_step_whatever_the_batch_learnt():
    batch_yield = BatchYield(3)
    for _ in range(10):  # learnt while other rows drafted: the wide step delivered twice what they expected
        batch_yield.observe(2, expected_extra=8.0, committed_extra=16)
    assert batch_yield.ratios[2] > 1.8
    table = batch_table(accepted=1.0, window_tokens=3.0)
    for row in ROWS:
        table.reset(row, lookahead=False)
    assert choose(table, table.batch_extra(ROWS, [4] * 8), (1.0, 1.4, 1.8), batch_yield.ratios) == 0
    assert table.batch_extra(ROWS, [4] * 8).tolist() == [0.0, 0.0, 0.0]
    table.observe_rows(ROWS, 0, numpy.zeros(8, dtype=int))  # nothing to learn
    assert table.window_tokens[:, 2].tolist() == [3.0] * 8


def test_a_step_teaches_every_row_at_once_as_it_teaches_each():
    """`observe_rows` (a step that drafts nothing on the host, for every row at once) leaves each row's statistics
    where `observe` for that row alone would, for a plain step and a device-drafted one."""
    device = ld.LookaheadConfig(window=1, ngram=2, guesses=0, candidate_length=K, tree_nodes=7, device_drafts=True)
    shapes, rng = (*SHAPES, device), random.Random(5)
    together, alone = (ChooserTable(shapes, (1.0, 1.1, 1.6, 1.7, 1.5), len(ROWS)) for _ in range(2))
    for _ in range(40):
        shape = rng.choice([0, 4])
        accepted = numpy.array([rng.randrange(K + 1) for _ in ROWS])
        together.observe_rows(ROWS, shape, accepted)
        for row in ROWS:
            alone.observe(row, shape, 7 if shape else 0, list(range(accepted[row])))
    for name in ("accepted", "in_run", "window_tokens", "window_credit", "window_rate", "window_runs"):
        assert getattr(together, name).tolist() == getattr(alone, name).tolist(), name


def test_chooser_rejects_bad_costs():
    with pytest.raises(ValueError, match="step costs must be positive"):
        ShapeChooser(SHAPES[:2], (1.0, 0.0))
    with pytest.raises(ValueError, match="one cost per shape"):
        ShapeChooser(SHAPES[:2], (1.0,))


# ---------------------------------------------------------------------------------------------- the default path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty calibration cache, in this process (plans kept in memory) and on disk."""
    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(tmp_path))
    runners._plans.clear()
    return tmp_path


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_default_generate_is_auto_and_exact(cache_dir, arch):
    model = tiny_model(arch)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5]])
    out = ld.generate(model, prompt, 40)
    assert out.sequences.tolist() == greedy_reference(model, prompt, 40).tolist()
    assert out.plan.shapes[0] == AUTOREGRESSIVE and out.plan.shapes[-1].has_window
    assert len(out.plan.costs_ms) == len(out.plan.shapes)
    assert (cache_dir / plan_cache.CACHE_FILE).exists()


def test_calibration_is_cached_and_reused(cache_dir, monkeypatch):
    model = tiny_model("llama")
    first = runners.auto_plan(model)
    runners._plans.clear()  # a new process: only the file remains
    monkeypatch.setattr(runners, "calibrate_model", lambda *a: pytest.fail("calibrated again despite the cache"))
    assert runners.auto_plan(model) == first


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"version": 999, "plans": {}}',
                                     '{"version": VERSION, "plans": {"KEY": {"shapes": [{"window": -1}], "costs_ms": [1]}}}',
                                     '{"version": VERSION, "plans": {"KEY": {"shapes": [], "costs_ms": []}}}',
                                     '{"version": VERSION, "plans": {"KEY": "a string"}}',
                                     b"\xff\xfe binary"])
def test_a_corrupt_stale_or_foreign_cache_file_means_calibrate_again(cache_dir, content):
    model = tiny_model("llama")
    key = plan_cache.calibration_key(model, "dynamic")
    path = cache_dir / plan_cache.CACHE_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("KEY", key.replace('"', '\\"')).replace("VERSION", str(plan_cache.CALIBRATION_VERSION)))
    plan = runners.auto_plan(model)
    assert plan.shapes[0] == AUTOREGRESSIVE
    stored = json.loads(path.read_text())  # rewritten with the fresh plan
    assert StepPlan.from_dict(stored["plans"][key]) == plan


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(blocker / "cache"))
    model = tiny_model("qwen2")
    runners._plans.clear()
    plan = runners.auto_plan(model)
    assert "could not write the calibration cache" in caplog.text
    prompt = torch.tensor([[1, 2, 3]])
    assert ld.generate(model, prompt, 10, plan).sequences.tolist() == greedy_reference(model, prompt, 10).tolist()


def test_engines_are_reused_and_freed_with_their_model(cache_dir, monkeypatch):
    monkeypatch.setattr(runners, "STATIC_ENGINE_DEVICES", ("cpu",))
    model = tiny_model("llama", seed=7)  # a private model (other tests share the cached ones)
    model = type(model)._from_config(model.config, attn_implementation="sdpa").eval()
    config = ld.LookaheadConfig(3, 3, 3)
    first = runners.runner_for(model, (config,), 40)
    assert isinstance(first, StaticStep) and runners.runner_for(model, (config,), 50) is first  # same bucket
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    for _ in range(2):  # a reused engine starts each generation afresh
        out = ld.generate(model, prompt, 30, config)
        assert out.sequences.tolist() == greedy_reference(model, prompt, 30).tolist()
    alive = weakref.ref(model)
    del model, first, out
    gc.collect()
    assert alive() is None


def test_explicit_config_runs_that_shape_only(cache_dir):
    model = tiny_model("llama")
    config = ld.LookaheadConfig(3, 4, 3)
    out = ld.generate(model, torch.tensor([[3, 4, 3, 4, 3]]), 30, config)
    assert out.plan == StepPlan((config,), (1.0,))
    assert set(out.stats.shape_steps) == {"lookahead W=3 N=4 G=3 K=3 B=9"}


def test_config_of_the_wrong_type(cache_dir):
    with pytest.raises(TypeError, match='config must be a LookaheadConfig, a StepPlan, "auto" or None, got'):
        ld.generate(tiny_model("llama"), torch.tensor([[1, 2]]), 5, config=(7, 5, 7))


# ---------------------------------------------------------------------------------------------- steps that cannot fit


def test_a_step_longer_than_the_context_is_refused_before_any_work(cache_dir):
    config = ld.LookaheadConfig(window=100, ngram=4, guesses=0)  # 300 rows, context 256
    with pytest.raises(ValueError, match=r"a lookahead step of W=100, N=4, G=0, B=0 has 300 tokens, more than the "
                       r"model's context of 256 leaves after the 3-token prompt; its rows are \(N-1\)·W \+ B: lower "
                       r"W, N or tree_nodes \(B, by default G·K\)"):
        ld.generate(tiny_model("llama"), torch.tensor([[1, 2, 3]]), 5, config)


def test_a_step_larger_than_memory_is_refused(cache_dir, monkeypatch):
    monkeypatch.setattr(decoding, "available_memory", lambda device: 2**16)
    config = ld.LookaheadConfig(window=60, ngram=3, guesses=10)  # 140 rows on a 256-token model
    with pytest.raises(ValueError, match=r"a lookahead step of W=60, N=3, G=10, B=20 \(140 tokens\) needs about .* "
                       r"GiB, more than the 0.0 GiB free on cpu; its rows are \(N-1\)·W \+ B: lower W, N or "
                       r"tree_nodes"):
        ld.generate(tiny_model("llama"), torch.tensor([[1, 2, 3]]), 5, config)


# ---------------------------------------------------------------------------------------------- near the context


def near_context_prompt(model, room: int) -> torch.Tensor:
    """A repetitive prompt (drafts get accepted) that leaves `room` tokens of the model's context."""
    length = ModelAdapter(model).context_length - room
    return torch.tensor([[5, 17, 42, 8][i % 4] for i in range(length)])[None]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_auto_decodes_a_prompt_that_fits_only_with_small_steps(arch):
    model = tiny_model(arch)
    prompt = near_context_prompt(model, 6)
    out = ld.generate(model, prompt, 6)
    assert out.sequences.tolist() == greedy_reference(model, prompt, 6).tolist()
    assert out.plan.shapes[0] == AUTOREGRESSIVE
    assert all(prompt.shape[1] + shape.tokens_per_step <= ModelAdapter(model).context_length
               for shape in out.plan.shapes)


def test_auto_keeps_the_shapes_that_fit_with_their_costs(monkeypatch):
    plan = StepPlan(SHAPES, (1.0, 2.0, 3.0, 4.0))  # 1, 7, 24 and 13 rows
    monkeypatch.setattr(decoding, "auto_plan", lambda *args: plan)
    model = tiny_model("llama")
    prompts = [near_context_prompt(model, 10)[0].tolist(), [3, 4, 3, 4]]  # the longest prompt decides
    out = ld.generate(model, prompts, [6, 20], "auto")
    assert out.plan == StepPlan(SHAPES[:2], (1.0, 2.0))
    assert [row.tokens for row in out.rows] == [greedy_reference(model, torch.tensor([prompt]), limit)[0].tolist()
                                                for prompt, limit in zip(prompts, [6, 20])]


def test_auto_falls_back_to_plain_steps_when_memory_is_short(monkeypatch):
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    plain = decoding.step_memory_bytes(adapter, 1, 3 + 5 + 1)
    monkeypatch.setattr(decoding, "auto_plan", lambda *args: StepPlan(SHAPES, (1.0, 2.0, 3.0, 4.0)))
    monkeypatch.setattr(decoding, "available_memory", lambda device: plain)
    prompt = torch.tensor([[1, 2, 3]])
    out = ld.generate(model, prompt, 5)
    assert out.plan == StepPlan((AUTOREGRESSIVE,), (1.0,))
    assert out.sequences.tolist() == greedy_reference(model, prompt, 5).tolist()


@pytest.mark.parametrize("config", [ld.LookaheadConfig(3, 4, 3), StepPlan((AUTOREGRESSIVE, ld.LookaheadConfig(3, 4, 3)),
                                                                          (1.0, 2.0))],
                         ids=["config", "plan"])
def test_an_explicit_shape_near_the_context_is_still_refused(config):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"^a lookahead step of W=3, N=4, G=3, B=9 has 18 tokens, more than the "
                       r"model's context of 256 leaves after the 250-token prompt; its rows are \(N-1\)·W \+ B: "
                       r"lower W, N or tree_nodes \(B, by default G·K\)$"):
        ld.generate(model, near_context_prompt(model, 6), 6, config)


def test_auto_says_so_when_not_even_a_plain_step_fits(monkeypatch):
    monkeypatch.setattr(decoding, "auto_plan", lambda *args: StepPlan(SHAPES, (1.0, 2.0, 3.0, 4.0)))
    monkeypatch.setattr(decoding, "available_memory", lambda device: 0)
    with pytest.raises(ValueError, match=r"^no step of the calibrated plan fits: its smallest, plain, \(1 tokens\) "
                       r"needs about 0.0 GiB, more than the 0.0 GiB free on cpu$"):
        ld.generate(tiny_model("llama"), torch.tensor([[1, 2, 3]]), 5)


class CompiledStandIn:
    """A runner that says it is compiled and whose step of shape `slow` takes `seconds` longer than the engine's."""

    compile = True

    def __init__(self, engine: StaticStep, slow: int, seconds: float) -> None:
        self.engine, self.slow, self.seconds = engine, slow, seconds

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, shape, *args):
        if shape == self.slow:
            time.sleep(self.seconds)
        return self.engine.step(shape, *args)


def test_a_compiled_runner_times_autos_plan_on_itself():
    shapes = (AUTOREGRESSIVE, ld.LookaheadConfig(2, 3, 2))
    engine = StaticStep(tiny_model("llama"), shapes, 64, cuda_graph=False, sampling=True)
    calibrated = StepPlan(shapes, (1.0, 1.0), (1.0, 1.0))
    assert runners.compiled_plan(calibrated, engine, sampling=True) is calibrated  # not compiled: as calibrated
    compiled = CompiledStandIn(engine, slow=1, seconds=0.02)
    sampled = runners.compiled_plan(calibrated, compiled, sampling=True)
    assert sampled.shapes == shapes
    assert sampled.costs_ms[1] - sampled.costs_ms[0] > 15 and sampled.greedy_costs_ms[1] - sampled.greedy_costs_ms[0] > 15
    assert runners.compiled_plan(calibrated, compiled, sampling=True) is sampled  # timed once per runner
    greedy = runners.compiled_plan(StepPlan(shapes, (1.0, 1.0)), compiled)
    assert greedy.greedy_costs_ms is None and greedy.costs_ms[1] - greedy.costs_ms[0] > 15
    one_shape = StepPlan(shapes[1:], (1.0,))
    assert runners.compiled_plan(one_shape, CompiledStandIn(engine, slow=0, seconds=0.0)) is one_shape


def test_batch_step_costs_survive_one_slow_first_step():
    from lookahead_decoding.shape_choice import StepCosts

    costs = StepCosts([1.0, 3.0], measured=True)
    costs.observe(1, 40.0)  # a slow first sample: the wide shape keeps its calibrated cost and is tried again
    assert costs.costs_ms == [1.0, 3.0]
    costs.observe(1, 4.0)
    costs.observe(1, 4.2)
    assert costs.costs_ms == [1.0, 4.2]  # the median of what it measured
    for _ in range(20):
        costs.observe(1, 5.0)
    assert costs.costs_ms[1] == 5.0  # only recent steps count
    unmeasured = StepCosts([1.0, 3.0], measured=False)
    unmeasured.observe(1, 9.0)
    assert unmeasured.costs_ms == [1.0, 3.0]
    assert unmeasured.recent_ms == [[], [9.0]]


def test_a_batch_step_cost_measured_in_a_burst_expires_so_the_shape_is_tried_again():
    from lookahead_decoding.shape_choice import StepCosts

    costs = StepCosts([1.0, 3.0], measured=True, max_age=50)
    for _ in range(3):
        costs.observe(1, 30.0)  # every row indexing its prompt at once: the wide shape looks 10x dearer
    assert costs.costs_ms == [1.0, 30.0]
    for _ in range(47):
        costs.observe(0, 1.2)
    assert costs.costs_ms == [1.2, 30.0]  # still remembered after 50 steps
    costs.observe(0, 1.2)
    assert costs.costs_ms == [1.2, 3.0]  # the first sample has expired, too few are left: back at its calibrated cost, to be measured again
    assert costs.recent_ms[1] == [30.0, 30.0]
    for _ in range(3):
        costs.observe(1, 3.5)
    assert costs.costs_ms == [1.2, 3.5]
