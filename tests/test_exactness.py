"""Greedy lookahead decoding equals `model.generate(do_sample=False)` token for token, on every architecture."""

from collections.abc import Sequence

import pytest
import torch
from conftest import ARCHITECTURES, VOCAB, greedy_reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lookahead_decoding as ld
from lookahead_decoding.drafting import CandidateSource


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
    prompt=prompts(),
    max_new_tokens=st.integers(1, 40),
    eos_index=st.one_of(st.none(), st.integers(0, 39)),
)
def test_equals_greedy(arch, window, ngram, guesses, candidate_length, prompt, max_new_tokens, eos_index):
    model = tiny_model(arch)
    input_ids = torch.tensor([prompt])
    eos = None
    if eos_index is not None and eos_index < max_new_tokens:
        # An EOS id taken from greedy's own output, so generation stops mid-way (often inside an accepted block).
        eos = int(greedy_reference(model, input_ids, max_new_tokens)[0, len(prompt) + eos_index])
    expected = greedy_reference(model, input_ids, max_new_tokens, eos_token_id=eos)
    config = ld.LookaheadConfig(window, ngram, guesses, candidate_length=candidate_length)
    out = ld.generate(model, input_ids, max_new_tokens, config, eos_token_id=eos)
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.new_tokens == expected.shape[1] - len(prompt)
    assert sum(out.stats.accepted_histogram.values()) == out.stats.steps
    assert sum(k * v for k, v in out.stats.accepted_histogram.items()) + 1 == out.stats.new_tokens
    assert max(out.stats.accepted_histogram, default=1) <= config.candidate_length + 1


class OracleSource(CandidateSource):
    """Proposes the true greedy continuation, so every candidate is accepted in full."""

    def __init__(self, reference: Sequence[int], length: int) -> None:
        self.reference, self.length = list(reference), length

    def begin(self, prompt):
        pass

    def propose(self, history, limit):
        guess = self.reference[len(history) : len(history) + self.length]
        return [tuple(guess + [0] * (self.length - len(guess)))][:limit]

    def observe(self, history, num_new):
        pass


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("ngram, candidate_length", [(2, 1), (3, 2), (5, 4), (3, 6), (4, 1)])
def test_full_acceptance_commits_k_plus_1_tokens_and_keeps_the_cache_right(arch, ngram, candidate_length):
    model = tiny_model(arch)
    input_ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(ngram))
    max_new_tokens = 4 * (candidate_length + 1) + 1  # the prefill's token, then exactly four full steps
    expected = greedy_reference(model, input_ids, max_new_tokens)
    config = ld.LookaheadConfig(window=3, ngram=ngram, guesses=2, candidate_length=candidate_length)
    source = OracleSource(expected[0].tolist(), candidate_length)
    out = ld.decoding.decode(model, input_ids, max_new_tokens, config, source=source)
    assert out.sequences.tolist() == expected.tolist()
    assert dict(out.stats.accepted_histogram) == {candidate_length + 1: 4}


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
