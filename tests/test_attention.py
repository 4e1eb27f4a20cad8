"""The folded grouped-query attention (attention.py) against plain SDPA over K and V expanded per query head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import repeat_kv

import lookahead_decoding as ld
from lookahead_decoding import attention
from lookahead_decoding.attention import NAME, fold_mask, folded_gqa_attention

from conftest import greedy_reference, tiny_model


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(1, 4), queries=st.integers(1, 9),
       keys=st.integers(1, 20), mask_batch=st.booleans(), boolean=st.booleans(), seed=st.integers(0, 2**16))
def test_folded_attention_equals_sdpa_over_expanded_heads(batch, kv_heads, groups, queries, keys, mask_batch,
                                                          boolean, seed):
    generator = torch.Generator().manual_seed(seed)
    heads, dim = kv_heads * groups, 8
    query = torch.randn(batch, heads, queries, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    allowed = torch.rand(batch if mask_batch else 1, 1, queries, keys, generator=generator) < 0.7
    allowed[..., 0] = True  # every query sees at least one key
    mask = allowed if boolean else torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -1e30)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(folded_gqa_attention(query, key, value, mask, 0.3), expected)
    # The mask folded already (as model_adapter folds the masks it builds, once per forward), or for other heads.
    for fold in (groups, groups + 1):
        torch.testing.assert_close(folded_gqa_attention(query, key, value, fold_mask(mask, fold), 0.3), expected)


def test_an_sdpa_model_runs_the_folded_attention_and_still_matches_greedy(monkeypatch):
    model = tiny_model("qwen2", seed=5)
    prompt = torch.tensor([[5, 9, 2, 11, 5, 9, 2]])
    expected = greedy_reference(model, prompt, 24)
    folded_calls = []
    monkeypatch.setattr(attention, "folded_gqa_attention",
                        lambda *args: folded_calls.append(args[0].shape) or folded_gqa_attention(*args))
    out = ld.generate(model, prompt, max_new_tokens=24, config=ld.LookaheadConfig(window=4, ngram=3, guesses=3))
    assert model.config._attn_implementation == NAME
    assert folded_calls  # every step's layers, under the step's mask
    assert out.sequences.tolist() == expected.tolist()
    # The model's own generate, padded batch included, runs on the registered attention and its masks.
    padded = torch.tensor([[0, 5, 9, 2], [7, 5, 9, 2]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    again = greedy_reference(model, padded, 8, attention_mask=mask)
    model.set_attn_implementation("sdpa")
    try:
        assert again.tolist() == greedy_reference(model, padded, 8, attention_mask=mask).tolist()
    finally:
        model.set_attn_implementation(NAME)


@pytest.mark.parametrize("implementation", ["eager"])
def test_other_attention_implementations_are_left_as_chosen(implementation):
    model = tiny_model("llama", seed=3, attn_implementation=implementation)
    ld.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert model.config._attn_implementation == implementation
