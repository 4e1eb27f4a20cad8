"""CUDA only (CI has no GPU and skips these): the captured engine equals eager decoding token for token, and the
default path runs on it. Run on a GPU machine with `python -m pytest -q -m gpu tests/test_gpu.py`."""

import pytest
import torch
from conftest import VOCAB, greedy_reference, real_vocabulary_model, tiny_model

import lookahead_decoding as ld
from lookahead_decoding import engine, runners, split_attention
from lookahead_decoding import scheduler as scheduler_module
from lookahead_decoding.attention import fold_mask, folded_gqa_attention
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.decoding import open_scheduler
from lookahead_decoding.device_drafts import DeviceDrafter
from lookahead_decoding.engine import StaticStep
from lookahead_decoding.tuning import StepPlan, verify_only

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE_DRAFTS = ld.LookaheadConfig(1, 2, 1, candidate_length=3, tree_nodes=8, device_drafts=True)
DEVICE_WINDOW = ld.LookaheadConfig(3, 3, 2, candidate_length=3, tree_nodes=10, device_drafts=True)
SHAPES = (AUTOREGRESSIVE, verify_only(6, 3), ld.LookaheadConfig(4, 4, 4), DEVICE_DRAFTS, DEVICE_WINDOW)
COSTS = (1.0, 1.2, 1.5, 1.1, 1.2)


@pytest.fixture(autouse=True)
def two_attention_widths(monkeypatch):
    """Engines of max_length 96 read the cache through two widths here, 48 slots and the widest, not the suite's
    four: every width of every shape is a graph recorded up front, and captures are what these tests spend their
    time on. The sequences here cross from one width to the other."""
    monkeypatch.setattr(engine, "NARROWEST_WIDTH", 48)


def cuda_model(arch):
    return tiny_model(arch).to("cuda")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_captured_graph_equals_eager(arch, shape):
    model = cuda_model(arch)
    captured = StaticStep(model, SHAPES, 96)
    eager = StaticStep(model, SHAPES, 96, cuda_graph=False)
    plan = StepPlan((SHAPES[shape],), (1.0,))
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (1, 5 + seed), generator=torch.Generator().manual_seed(seed)).cuda()
        prompt = prompt.repeat(1, 2) if seed == 1 else prompt
        expected = greedy_reference(model, prompt, 40)
        single = StaticStep(model, SHAPES[shape], 96)
        assert ld.generate(model, prompt, 40, plan, runner=single).sequences.tolist() == expected.tolist()
        for runner in (captured, eager):  # every shape of one multi-shape engine, switched between
            out = ld.generate(model, prompt, 40, StepPlan(SHAPES, COSTS), runner=runner)
            assert out.sequences.tolist() == expected.tolist()
    assert captured.captured and not eager.captured


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_captured_batch_with_refills_equals_each_rows_greedy(arch):
    model = cuda_model(arch)
    runners._engines.pop(model, None)  # engines other tests built for this model
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 30, (7,), generator=generator).tolist()
    prompts = [torch.randint(0, VOCAB, (length,), generator=generator).tolist() for length in lengths]
    prompts[2] = (prompts[2][:3] * 10)[:25]  # repetitive: long acceptances in one row
    out = ld.generate(model, prompts, 40, StepPlan(SHAPES, COSTS), batch_size=3)
    for prompt, row in zip(prompts, out.rows):
        assert row.tokens == greedy_reference(model, torch.tensor([prompt], device="cuda"), 40)[0].tolist()
    engines = list(runners._engines[model].values())
    assert [engine.batch_size for engine in engines] == [3] and engines[0].captured


@pytest.mark.parametrize("config", [AUTOREGRESSIVE, DEVICE_DRAFTS, DEVICE_WINDOW],
                         ids=["plain", "device drafts", "device window"])
@pytest.mark.parametrize("sampled", [False, True])
def test_pipelined_steps_on_captured_graphs_equal_each_rows_decode(sampled, config):
    """On CUDA plain steps and steps that draft on the device are pipelined by default: each launched, through its
    graph, before the host has read the one before. Rows refilled, ended by EOS and by their budgets still get
    their own tokens, greedy or sampled (as the eager engine, which reads every step, samples them), and so do
    rows whose prompts ride in the steps."""
    model = cuda_model("llama")
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (int(length),), generator=generator).tolist()
               for length in torch.randint(2, 20, (8,), generator=generator)]
    budgets = [30, 6, 18, 3, 25, 9, 14, 30]
    kwargs = dict(seed=list(range(8)), **SAMPLING) if sampled else {}
    alone = dict(seed=[0], **SAMPLING) if sampled else {}
    first = ld.generate(model, [prompts[0]], 30, AUTOREGRESSIVE, **alone).rows[0].tokens
    eos = first[len(prompts[0]) + 7]
    captured = StaticStep(model, config, 96, batch_size=3, sampling=sampled)
    chained, chain = [], captured.chain
    captured.chain = lambda *args: chained.append(args) or chain(*args)
    eager = StaticStep(model, config, 96, batch_size=3, sampling=sampled, cuda_graph=False, pipeline=False)
    outs = [ld.generate(model, prompts, budgets, config, runner=runner, eos_token_id=eos, **kwargs)
            for runner in (captured, eager)]
    assert [row.tokens for row in outs[0].rows] == [row.tokens for row in outs[1].rows]
    if not sampled:
        for prompt, budget, row in zip(prompts, budgets, outs[0].rows):
            expected = greedy_reference(model, torch.tensor([prompt], device="cuda"), budget, eos_token_id=eos)
            assert row.tokens == expected[0].tolist()
    assert captured.captured and captured.pipelined and len(chained) > outs[0].stats.steps / 2
    # Rows refilled while others decode carry their prompts in the device-drafting steps' graphs.
    assert (outs[0].stats.carried_prompts > 0) == (config is DEVICE_DRAFTS)


@pytest.mark.parametrize("sampled", [False, True])
def test_chained_switches_between_captured_shapes_equal_each_rows_decode(sampled, monkeypatch):
    """The batch alternates between the plain step and the two device-drafting shapes, each step a captured graph
    launched behind the unread one before it (a chained step of another shape lays its rows out from pinned
    memory)."""
    model = cuda_model("llama")
    shapes = (AUTOREGRESSIVE, DEVICE_DRAFTS, DEVICE_WINDOW)
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (int(length),), generator=generator).tolist()
               for length in torch.randint(2, 20, (8,), generator=generator)]
    budgets = [30, 6, 18, 3, 25, 9, 14, 30]
    sampling = dict(seed=list(range(8)), **SAMPLING) if sampled else {}
    expected = [row.tokens for row in ld.generate(model, prompts, budgets, AUTOREGRESSIVE, **sampling).rows]
    order = iter(range(10**6))
    monkeypatch.setattr(scheduler_module, "best_shape", lambda *args, **kwargs: next(order) % len(shapes))
    captured = StaticStep(model, shapes, 96, batch_size=3, sampling=sampled)
    switches, chain = [], captured.chain
    captured.chain = lambda previous, changes, *rest: switches.append(bool(rest) and rest[0] != previous.shape) or \
        chain(previous, changes, *rest)
    out = ld.generate(model, prompts, budgets, StepPlan(shapes, (1.0, 1.0, 1.0)), runner=captured, **sampling)
    assert [row.tokens for row in out.rows] == expected
    assert captured.captured and sum(switches) > out.stats.steps / 2


def test_default_path_runs_on_the_engine():
    model = cuda_model("llama")
    runners._engines.pop(model, None)  # engines other tests built for this model
    prompt = torch.tensor([[4, 5, 6, 4, 5, 6, 4]], device="cuda")
    out = ld.generate(model, prompt, 48)
    assert out.sequences.tolist() == greedy_reference(model, prompt, 48).tolist()
    engines = list(runners._engines[model].values())
    assert len(engines) == 1 and isinstance(engines[0], StaticStep) and engines[0].captured
    assert tuple(layout.config for layout in engines[0].layouts) == out.plan.shapes
    ld.generate(model, prompt, 48)
    assert list(runners._engines[model].values()) == engines  # reused, not rebuilt


def test_capture_survives_a_garbage_collection_of_another_engines_graphs():
    """An engine nobody holds (calibration builds several) sits in a reference cycle; a collection while another
    engine captures would destroy its graphs mid-capture, which CUDA forbids. Captures keep the collector off."""
    import gc

    model = cuda_model("llama")
    prompt = torch.tensor([[4, 5, 6, 4, 5, 6, 4]], device="cuda")
    abandoned = StaticStep(model, SHAPES, 96)
    abandoned.capture()
    del abandoned  # only the cycle through its step functions keeps it now
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # collect at every allocation of a container object
    try:
        engine = StaticStep(model, SHAPES, 96)
        engine.capture()
    finally:
        gc.set_threshold(*threshold)
    out = ld.generate(model, prompt, 24, StepPlan(SHAPES, (1.0,) * len(SHAPES)), runner=engine)
    assert out.sequences.tolist() == greedy_reference(model, prompt, 24).tolist()


SAMPLING = dict(do_sample=True, temperature=0.9, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.2)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_captured_sampling_equals_eager_and_plain_sampling(arch):
    """The captured sampling step chooses what the eager one does, and lookahead commits the tokens of plain
    sampling with the same seeds, in a batch with refills and alone."""
    model = cuda_model(arch)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (int(length),), generator=generator).tolist()
               for length in torch.randint(3, 20, (6,), generator=generator)]
    prompts[1] = (prompts[1][:3] * 8)[:20]
    seeds = list(range(100, 106))
    plain = ld.generate(model, prompts, 40, AUTOREGRESSIVE, seed=seeds, **SAMPLING)
    plan = StepPlan(SHAPES, COSTS)
    captured = StaticStep(model, SHAPES, 96, batch_size=3, sampling=True)
    eager = StaticStep(model, SHAPES, 96, batch_size=3, sampling=True, cuda_graph=False)
    for runner in (captured, eager):
        out = ld.generate(model, prompts, 40, plan, runner=runner, seed=seeds, **SAMPLING)
        assert [row.tokens for row in out.rows] == [row.tokens for row in plain.rows]
    alone = ld.generate(model, [prompts[4]], 40, plan, seed=[seeds[4]], **SAMPLING)
    assert alone.rows[0].tokens == plain.rows[4].tokens
    assert captured.captured and not eager.captured


def test_a_compiled_sampling_scheduler_commits_the_tokens_of_plain_sampling():
    """What `lookahead serve --compile` runs: a scheduler on a compiled engine that samples, drafting on the device,
    with greedy and sampled rows side by side, over a real model's vocabulary. Its steps for a temperature alone
    and with top-p compile at start (`capture_sampling`), so those requests compile nothing while rows wait."""
    model = real_vocabulary_model().to("cuda")
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (int(length),), generator=generator).tolist()
               for length in torch.randint(3, 20, (3,), generator=generator)]
    params = [None, ld.SamplingParams(temperature=0.9, top_p=0.95, seed=7), ld.SamplingParams(temperature=0.7, seed=8)]
    scheduler = open_scheduler(model, 2, 96, StepPlan((DEVICE_DRAFTS,), (1.0,)), compile=True)
    scheduler.runner.capture()
    for sampling in params[1:]:
        scheduler.runner.capture_sampling(sampling)
    compiled = dict(scheduler.runner._replayables)
    assert {stages for _, _, stages, _ in compiled} == {(), ("sampling",), ("sampling", "top_k_top_p")}
    for tag, (prompt, sampling) in enumerate(zip(prompts, params)):
        scheduler.submit(ld.Request(prompt, 24, tag=tag, sampling=sampling))
    done = {finished.tag: finished.tokens for finished in scheduler.run()}
    assert scheduler.runner.compile and scheduler.runner._replayables == compiled
    for tag, (prompt, sampling) in enumerate(zip(prompts, params)):
        kwargs = {} if sampling is None else dict(do_sample=True, temperature=sampling.temperature,
                                                 top_p=sampling.top_p, seed=[sampling.seed])
        plain = ld.generate(model, [prompt], 24, AUTOREGRESSIVE, **kwargs)
        assert done[tag] == plain.rows[0].tokens


def test_a_compiled_scheduler_times_autos_plan_on_its_compiled_engine(tmp_path, monkeypatch):
    """`auto`'s plan is calibrated uncompiled; a compiled engine's steps cost otherwise, so the scheduler's plan
    holds the same shapes timed on that engine, sampled (with top-p, over a real model's vocabulary) and greedy."""
    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(tmp_path))
    model = real_vocabulary_model().to("cuda")
    scheduler = open_scheduler(model, 1, 96, compile=True)
    calibrated = runners.auto_plan(model, batch_size=1, sampling=True)
    assert len(calibrated.shapes) > 1 and scheduler.plan.shapes == calibrated.shapes
    assert scheduler.plan is runners.runner_plan(scheduler.runner, sampling=True)
    assert scheduler.plan.greedy_costs_ms is not None and scheduler.plan.costs_ms != calibrated.costs_ms
    prompt = [5, 6, 7, 5, 6, 7, 5]
    scheduler.submit(ld.Request(prompt, 20, tag=0))
    (finished,) = scheduler.run()
    assert finished.tokens == greedy_reference(model, torch.tensor([prompt], device="cuda"), 20)[0].tolist()


def test_a_generator_on_cuda_is_accepted_on_cuda_0():
    model = cuda_model("llama")
    prompt = torch.tensor([[4, 5, 6, 4, 5, 6, 4]], device="cuda")
    runs = [ld.generate(model, prompt, 20, do_sample=True, generator=torch.Generator(device=device).manual_seed(5))
            for device in ("cuda", "cuda:0")]
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()


def test_the_device_tables_keep_the_same_write_of_a_token_written_many_times_as_the_cpus():
    """CUDA keeps an arbitrary one of an index_put's duplicate writes; the drafter keeps the last, as the CPU does,
    so that two runs of one batch draft alike."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 40, (32, 64), generator=generator)  # each token about 50 times
    befores = torch.randint(0, 3, (32, 64), generator=generator)
    logits = torch.randn(32, 64, 1000, generator=generator)
    drafters = [DeviceDrafter(1000, torch.device(device), []) for device in ("cpu", "cuda")]
    for drafter in drafters:
        device = drafter.device
        drafter.learn(tokens.to(device), befores.to(device), logits.to(device))
    cpu, cuda = drafters
    for table in ("table", "pair_table", "table_scores", "pair_scores", "pair_keys"):  # (not the spare row)
        assert torch.equal(getattr(cpu, table), getattr(cuda, table).cpu()), table



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 4, 16])
def test_the_split_kv_kernel_matches_sdpa_in_a_compiled_graph(dtype, queries):
    """Llama-3-8B's heads (32 query, 8 KV, 128 dims) over 1,100 slots, the engine's additive mask folded; the
    kernel compiled (torch.compile) and captured, as the compiled engine runs it."""
    generator = torch.Generator().manual_seed(queries)
    query = torch.randn(2, 32, queries, 128, generator=generator).to("cuda", dtype)
    key, value = (torch.randn(2, 8, 1100, 128, generator=generator).to("cuda", dtype) for _ in range(2))
    allowed = torch.rand(2, 1, queries, 1100, generator=generator).cuda() < 0.8
    mask = torch.zeros(allowed.shape, dtype=dtype, device="cuda").masked_fill(~allowed, torch.finfo(dtype).min)
    folded = fold_mask(mask, 4) if queries > 1 else mask
    assert split_attention.applies(query, key, folded)
    expected = folded_gqa_attention(query, key, value, mask, None)
    compiled = torch.compile(split_attention.split_kv_attention, dynamic=False)
    compiled(query, key, value, folded, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = compiled(query, key, value, folded, None)
    graph.replay()
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output, expected, **tolerance)
