"""The fixed-shape static-cache step (run eagerly on CPU) gives exactly greedy's tokens."""

import pytest
import torch
from conftest import VOCAB, greedy_reference, real_vocabulary_model, tiny_model

import lookahead_decoding as ld
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.decoding import decode
from lookahead_decoding.engine import ONE_TOKEN_COMPILE_OPTIONS, StaticStep
from lookahead_decoding.kv_cache import LayerStack

CONFIGS = [AUTOREGRESSIVE, ld.LookaheadConfig(1, 3, 2), ld.LookaheadConfig(3, 3, 3), ld.LookaheadConfig(5, 5, 5),
           ld.LookaheadConfig(4, 6, 0), ld.LookaheadConfig(2, 2, 8), ld.LookaheadConfig(3, 3, 3, candidate_length=6),
           ld.LookaheadConfig(2, 5, 4, candidate_length=1),
           ld.LookaheadConfig(1, 2, 1, candidate_length=4, tree_nodes=10, device_drafts=True),
           ld.LookaheadConfig(3, 4, 2, candidate_length=4, tree_nodes=16, device_drafts=True)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_static_engine_equals_greedy(arch, config):
    model = tiny_model(arch)
    engine = StaticStep(model, config, max_length=64)
    for seed in range(3):  # one engine, reused across prompts like the benchmark does
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, VOCAB, (1, 6), generator=generator)
        if seed == 1:
            prompt = prompt[:, :3].repeat(1, 4)  # repetitive: long acceptances
        expected = greedy_reference(model, prompt, 64 - prompt.shape[1])
        out = ld.generate(model, prompt, 64 - prompt.shape[1], config, runner=engine)
        assert out.sequences.tolist() == expected.tolist()


@pytest.mark.parametrize("config", [AUTOREGRESSIVE, CONFIGS[2], CONFIGS[-1]], ids=str)
def test_a_step_reads_the_narrowest_width_of_the_cache_that_holds_its_rows(llama, config, monkeypatch):
    """Attention reads the cache's first slots only, as many as the step's width (16, 32, 64, ... here; see
    conftest): the narrowest that holds every row's tokens and the step's. Too narrow a width changes tokens."""
    engine = StaticStep(llama, config, max_length=64, batch_size=2)
    size = engine.layouts[0].size
    assert engine.widths == (16, 32, 64, 64 + size)
    chosen, width_of = [], engine._width
    monkeypatch.setattr(engine, "_width", lambda shape: chosen.append((engine.length_bound.copy(), width_of(shape)))
                        or chosen[-1][1])
    prompts = [[5, 9, 2, 7, 5, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    expected = [greedy_reference(llama, torch.tensor([prompt]), 40)[0].tolist() for prompt in prompts]
    assert [row.tokens for row in ld.generate(llama, prompts, 40, config, runner=engine).rows] == expected
    for bound, width in chosen:
        assert width == min(w for w in engine.widths if w >= bound.max() + size)
    assert len({width for _, width in chosen}) >= 2  # the rows grew through widths
    monkeypatch.setattr(engine, "_width", lambda shape: engine.widths[0])
    assert [row.tokens for row in ld.generate(llama, prompts, 40, config, runner=engine).rows] != expected


def test_a_compiled_engine_equals_greedy(llama):
    """Compiled, the cache is written through `index_put_` (which Inductor writes in place) and the commit moves
    each layer's keys and values apart (kv_cache.py): the same tokens as the eager writes."""
    config = CONFIGS[-2]  # drafts on the device: the step writes the cache and moves the accepted path's KV
    engine = StaticStep(llama, config, max_length=48, batch_size=2, compile=True)
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 5, 6, 7]]
    out = ld.generate(llama, prompts, 20, config, runner=engine)
    assert [row.tokens for row in out.rows] == [greedy_reference(llama, torch.tensor([prompt]), 20)[0].tolist()
                                                for prompt in prompts]


def test_a_compiled_batch_1_engine_tunes_only_its_one_token_step(llama, monkeypatch):
    """Compiled, a batch-1 engine's plain step (one token: matrix-vector products) compiles under coordinate-descent
    tuning, a wider step or a batch's plain step under inductor's defaults; the tuned step equals greedy."""
    options = []
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: options.append(kwargs["options"])
                        or compile(function, **kwargs))
    for config, batch_size in ((CONFIGS[-2], 1), (AUTOREGRESSIVE, 2)):
        StaticStep(llama, config, max_length=48, batch_size=batch_size, compile=True).replayable(0)
    assert options == [None, None]
    prompt = [1, 2, 3, 4, 1, 2, 3, 4]
    out = ld.generate(llama, [prompt], 12, AUTOREGRESSIVE,
                      runner=StaticStep(llama, AUTOREGRESSIVE, max_length=48, compile=True))
    assert options[2:] == [ONE_TOKEN_COMPILE_OPTIONS]
    assert out.rows[0].tokens == greedy_reference(llama, torch.tensor([prompt]), 12)[0].tolist()


def test_a_compiled_engine_that_samples_commits_the_tokens_of_plain_sampling():
    """Compiled, top-k and top-p over a real model's vocabulary sort it whole and take the cumulative sum from torch's
    kernel (row_sampler.py): the same draws as eager plain sampling, a greedy row beside them included."""
    model = real_vocabulary_model()
    config = CONFIGS[-2]
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 3, 9, 3, 9], [1, 2, 3, 4, 5, 6]]
    params = [None, ld.SamplingParams(temperature=0.9, top_p=0.95, seed=7),
              ld.SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=8)]
    engine = StaticStep(model, config, max_length=48, batch_size=2, compile=True, sampling=True)
    results, _, _ = decode(model, prompts, 16, config, runner=engine, sampling=params)
    for finished, prompt, sampling in zip(sorted(results, key=lambda f: f.tag), prompts, params):
        kwargs = {} if sampling is None else dict(do_sample=True, temperature=sampling.temperature,
                                                 top_k=sampling.top_k, top_p=sampling.top_p, seed=[sampling.seed])
        assert finished.tokens == ld.generate(model, [prompt], 16, AUTOREGRESSIVE, **kwargs).rows[0].tokens


def test_the_length_bound_holds_what_each_row_holds(llama):
    """The host's bound on each row's length, which picks the width: never below the row's length on the device,
    exact after a step is read."""
    engine = StaticStep(llama, CONFIGS[2], max_length=64, batch_size=2)
    out = ld.generate(llama, [[5, 9, 2, 7, 5, 9], [3, 1, 4]], [30, 12], CONFIGS[2], runner=engine)
    assert engine.length_bound.tolist() == engine.lengths.tolist()
    assert [len(row.tokens) for row in out.rows][0] <= engine.length_bound[0] + 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("prefill_chunk", [1, 4, 5])
def test_prompts_longer_than_a_prefill_chunk(arch, prefill_chunk):
    model = tiny_model(arch)
    config = ld.LookaheadConfig(3, 3, 3)
    engine = StaticStep(model, config, max_length=48, prefill_chunk=prefill_chunk)
    for length in (1, 9, 20):  # one chunk or less, several with a partial last chunk, exact multiples of 4 and 5
        prompt = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
        out = ld.generate(model, prompt, 48 - length, config, runner=engine)
        assert out.sequences.tolist() == greedy_reference(model, prompt, 48 - length).tolist()


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_engine_rejects_a_bad_prefill_chunk(llama, chunk):
    with pytest.raises(ValueError, match=f"prefill_chunk must be a positive integer, got {chunk!r}"):
        StaticStep(llama, AUTOREGRESSIVE, 32, prefill_chunk=chunk)


def test_autoregressive_engine_takes_one_token_per_step(llama):
    out = ld.generate(llama, torch.tensor([[3, 1, 4, 1, 5]]), 20, AUTOREGRESSIVE, runner=StaticStep(llama, AUTOREGRESSIVE, 32))
    assert out.stats.steps == 19 and dict(out.stats.accepted_histogram) == {1: 19}


def test_engine_rejects_sliding_window_models():
    with pytest.raises(ld.UnsupportedModelError, match="MistralForCausalLM uses sliding-window attention"):
        StaticStep(tiny_model("mistral"), AUTOREGRESSIVE, 32)


def test_engine_rejects_what_does_not_fit(llama):
    with pytest.raises(ValueError, match="max_length 300 exceeds the model's context length of 256"):
        StaticStep(llama, AUTOREGRESSIVE, 300)
    engine = StaticStep(llama, AUTOREGRESSIVE, 16)
    # Checked before the first step: nothing is generated and then thrown away.
    with pytest.raises(ValueError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(20\) = 23 tokens does not fit "
                       "this engine's max_length 16"):
        ld.generate(llama, torch.tensor([[1, 2, 3]]), 20, AUTOREGRESSIVE, runner=engine)


@pytest.mark.parametrize("max_length", [0, 1, -5, "64", 64.0, True])
def test_engine_rejects_a_bad_max_length(llama, max_length):
    with pytest.raises(ValueError, match=f"max_length must be an integer >= 2 \\(prompt \\+ new tokens\\), got "
                       f"{max_length!r}"):
        StaticStep(llama, AUTOREGRESSIVE, max_length)


def test_an_engine_belongs_to_its_model(llama):
    engine = StaticStep(llama, AUTOREGRESSIVE, 32)
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="the step runner was built for another model"):
        ld.generate(other, torch.tensor([[1, 2, 3]]), 5, AUTOREGRESSIVE, runner=engine)
    with pytest.raises(ValueError, match="the step runner was built for another model"):  # other vocabulary too
        ld.generate(tiny_model("gpt2"), torch.tensor([[1, 2, 3]]), 5, AUTOREGRESSIVE, runner=engine)


def test_runner_must_match_the_config(llama):
    engine = StaticStep(llama, AUTOREGRESSIVE, 16)
    with pytest.raises(ValueError, match="the step runner was built for"):
        ld.generate(llama, torch.tensor([[1, 2, 3]]), 5, ld.LookaheadConfig(), runner=engine)


def test_generate_takes_a_prebuilt_engine(llama):
    config = ld.LookaheadConfig(3, 4, 3)
    engine = ld.StaticStep(llama, config, max_length=48)
    prompt = torch.tensor([[7, 8, 9, 7, 8, 9, 7]])
    out = ld.generate(llama, prompt, 30, config, runner=engine)
    assert out.sequences.tolist() == greedy_reference(llama, prompt, 30).tolist()
    with pytest.raises(ValueError, match="runner= is a greedy step runner: it cannot sample"):
        ld.generate(llama, prompt, 30, config, runner=engine, do_sample=True)
    # One built to sample samples, with the tokens of plain sampling with the same seed.
    sampling_engine = ld.StaticStep(llama, config, max_length=48, sampling=True)
    sampled = ld.generate(llama, prompt, 30, config, runner=sampling_engine, do_sample=True, seed=4)
    plain = ld.generate(llama, prompt, 30, ld.LookaheadConfig(1, 2, 0), do_sample=True, seed=4)
    assert sampled.sequences.tolist() == plain.sequences.tolist()


def test_every_layer_keeps_its_keys_and_values_in_one_tensor(llama):
    engine = StaticStep(llama, ld.LookaheadConfig(3, 3, 3), max_length=32)
    ld.generate(llama, torch.tensor([[3, 1, 4, 1, 5]]), 8, runner=engine)
    (stack,) = engine.cache.stack.tensors  # so that a commit moves every layer's in one gather and one scatter
    layers = engine.cache.layers
    assert stack.shape == (2 * len(layers), *layers[0].keys.shape)
    entries = [tensor for layer in layers for tensor in (layer.keys, layer.values)]
    assert all(tensor.data_ptr() == stack[i].data_ptr() for i, tensor in enumerate(entries))


def test_a_layer_of_another_shape_gets_a_tensor_of_its_own():
    stack = LayerStack(layers=2)
    first, second = stack.place(torch.zeros(1, 2, 8, 4)), stack.place(torch.zeros(1, 2, 8, 4))
    odd = stack.place(torch.zeros(1, 3, 8, 4))
    assert [tuple(tensor.shape) for tensor in stack.tensors] == [(4, 1, 2, 8, 4), (1, 1, 3, 8, 4)]
    assert (first.data_ptr(), second.data_ptr(), odd.data_ptr()) == (
        stack.tensors[0][0].data_ptr(), stack.tensors[0][1].data_ptr(), stack.tensors[1][0].data_ptr())
    sources, targets = torch.tensor([[5, 6]]), torch.tensor([[1, 2]])
    for tensor in (first, odd):
        tensor.copy_(torch.randn(tensor.shape))
    before = [first.clone(), odd.clone()]
    stack.move(sources, targets)
    for moved, original in zip((first, odd), before):
        assert torch.equal(moved[:, :, [1, 2]], original[:, :, [5, 6]])
        assert torch.equal(moved[:, :, [0, 3, 4, 5, 6, 7]], original[:, :, [0, 3, 4, 5, 6, 7]])
