"""Greedy lookahead decoding equals `model.generate(do_sample=False)` token for token, on every architecture."""

import pytest
import torch
from conftest import ARCHITECTURES, VOCAB, OracleSource, greedy_reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lookahead_decoding as ld
from lookahead_decoding.engine import StaticStep


@st.composite
def prompts(draw):
    length = draw(st.integers(1, 20))
    if draw(st.booleans()):
        return draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
    # Repetitive prompts make the model's output repetitive too, so long candidates get accepted.
    motif = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4))
    return (motif * 20)[:length]


@settings(max_examples=240, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    arch=st.sampled_from(sorted(ARCHITECTURES)),
    window=st.integers(1, 8),
    ngram=st.integers(2, 6),
    guesses=st.integers(0, 8),
    candidate_length=st.one_of(st.none(), st.integers(1, 8)),
    tree_nodes=st.one_of(st.none(), st.integers(0, 40)),
    source=st.sampled_from([None, "pool", "suffix", "recycled", ("pool", "suffix", "recycled")]),
    prompt=prompts(),
    max_new_tokens=st.integers(1, 40),
    eos_index=st.one_of(st.none(), st.integers(0, 39)),
)
def test_equals_greedy(arch, window, ngram, guesses, candidate_length, tree_nodes, source, prompt, max_new_tokens,
                       eos_index):
    model = tiny_model(arch)
    input_ids = torch.tensor([prompt])
    eos = None
    if eos_index is not None and eos_index < max_new_tokens:
        # An EOS id taken from greedy's own output, so generation stops mid-way (often inside an accepted block).
        eos = int(greedy_reference(model, input_ids, max_new_tokens)[0, len(prompt) + eos_index])
    expected = greedy_reference(model, input_ids, max_new_tokens, eos_token_id=eos)
    config = ld.LookaheadConfig(window, ngram, guesses, candidate_length=candidate_length, tree_nodes=tree_nodes)
    out = ld.generate(model, input_ids, max_new_tokens, config, eos_token_id=eos, source=source)
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.new_tokens == expected.shape[1] - len(prompt)
    assert sum(out.stats.accepted_histogram.values()) == out.stats.steps
    assert sum(k * v for k, v in out.stats.accepted_histogram.items()) + 1 == out.stats.new_tokens
    assert max(out.stats.accepted_histogram, default=1) <= config.candidate_length + 1


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("ngram, candidate_length, decoys", [(2, 1, 0), (3, 2, 1), (5, 4, 0), (3, 6, 5), (4, 1, 1)])
def test_full_acceptance_down_one_branch_commits_k_plus_1_tokens_and_keeps_the_cache_right(
        arch, ngram, candidate_length, decoys):
    model = tiny_model(arch)
    input_ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(ngram))
    max_new_tokens = 4 * (candidate_length + 1) + 1  # the prefill's token, then exactly four full steps
    expected = greedy_reference(model, input_ids, max_new_tokens)
    config = ld.LookaheadConfig(window=3, ngram=ngram, guesses=2, candidate_length=candidate_length)
    source = OracleSource(expected[0].tolist(), decoys)
    out = ld.generate(model, input_ids, max_new_tokens, config, source=source)
    assert out.sequences.tolist() == expected.tolist()
    assert dict(out.stats.accepted_histogram) == {candidate_length + 1: 4}
    if arch in ("llama", "gpt2") and decoys:  # the same on the static engine
        out = ld.generate(model, input_ids, max_new_tokens, config, source=source,
                          runner=StaticStep(model, config, 64))
        assert dict(out.stats.accepted_histogram) == {candidate_length + 1: 4}
        assert out.sequences.tolist() == expected.tolist()


def test_hf_generate_reaches_lookahead(llama):
    input_ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))
    expected = greedy_reference(llama, input_ids, 30)
    calls = []
    hook = llama.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = llama.generate(input_ids, do_sample=False, max_new_tokens=30, custom_generate=ld.lookahead_generate,
                             lookahead_config=ld.LookaheadConfig(4, 3, 2))
    finally:
        hook.remove()
    assert out.tolist() == expected.tolist()
    assert calls[1:] and set(calls[1:]) == {ld.LookaheadConfig(4, 3, 2).tokens_per_step}  # fused steps, not plain ones
