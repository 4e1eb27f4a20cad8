"""The folded grouped-query attention (attention.py) against plain SDPA over K and V expanded per query head."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import repeat_kv

import lookahead_decoding as ld
from lookahead_decoding import attention
from lookahead_decoding.attention import NAME, fold_mask, folded_gqa_attention

from conftest import COMMON, greedy_reference, tiny_model


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


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(1, 4), queries=st.integers(1, 9),
       keys=st.integers(1, 40), mask_batch=st.booleans(), folded=st.booleans(), seed=st.integers(0, 2**16))
def test_flex_decoding_attention_equals_the_folded_sdpa(batch, kv_heads, groups, queries, keys, mask_batch, folded,
                                                         seed):
    generator = torch.Generator().manual_seed(seed)
    heads, dim = kv_heads * groups, 8
    query = torch.randn(batch, heads, queries, dim, generator=generator)
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    allowed = torch.rand(batch if mask_batch else 1, 1, queries, keys, generator=generator) < 0.7
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = folded_gqa_attention(query, key, value, mask, 0.3)
    given_mask = fold_mask(mask, groups) if folded else mask
    torch.testing.assert_close(attention.flex_decoding_attention(query, key, value, given_mask, 0.3), expected)


@pytest.mark.parametrize("head_size, flex", [(8, False), (12, False), (16, True), (64, True)])
def test_flex_attention_takes_steps_of_few_rows_under_our_masks_only(monkeypatch, head_size, flex):
    calls = []
    monkeypatch.setattr(attention, "flex_decoding_attention", lambda *args: calls.append("flex"))
    monkeypatch.setattr(attention, "lookahead_sdpa_forward", lambda *args, **kwargs: calls.append("sdpa"))
    key = value = torch.zeros(1, 2, 40, head_size)
    additive = torch.zeros(1, 1, 8, 40)
    for rows, mask, kwargs in ((8, additive, {}), (32, additive[:, :, :1].expand(-1, -1, 32, -1), {}),
                               (8, additive > 0, {}), (8, None, {}), (8, additive, {"softcap": 30.0}),
                               (8, additive, {"dropout": 0.1})):
        calls.clear()
        attention.lookahead_flex_forward(None, torch.zeros(1, 8, rows, head_size), key, value, mask, **kwargs)
        # 4 query heads per KV head: 32 rows of 4 are 128 folded rows, too many for the decoding kernel
        takes_flex = flex and rows == 8 and mask is additive and not kwargs
        assert calls == ["flex" if takes_flex else "sdpa"]


def test_a_model_on_the_flex_attention_decodes_its_steps_there_and_still_matches_greedy(monkeypatch):
    # 4 query heads per KV head, of 16 dimensions (flex attention's kernels take head sizes of 16 and more)
    config = transformers.Qwen3Config(**{**COMMON, "head_dim": 16, "num_key_value_heads": 1}, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)
    torch.manual_seed(5)
    model = transformers.Qwen3ForCausalLM._from_config(config, attn_implementation=attention.FLEX_NAME).eval()
    prompt = torch.tensor([[5, 9, 2, 11, 5, 9, 2]])
    expected = greedy_reference(model, prompt, 24)
    flex_rows, sdpa_rows = [], []
    flex_decoding = attention.flex_decoding_attention
    monkeypatch.setattr(attention, "flex_decoding_attention",
                        lambda *args: flex_rows.append(args[0].shape[2]) or flex_decoding(*args))
    monkeypatch.setattr(attention, "folded_gqa_attention",
                        lambda *args: sdpa_rows.append(args[0].shape[2]) or folded_gqa_attention(*args))
    for config in (ld.LookaheadConfig(window=4, ngram=3, guesses=3), ld.LookaheadConfig(window=40, ngram=4)):
        out = ld.generate(model, prompt, max_new_tokens=24, config=config)
        assert out.sequences.tolist() == expected.tolist()
    assert model.config._attn_implementation == attention.FLEX_NAME
    # Steps of fewer than 32 query rows (x 4 heads) went to flex attention, the wide window's to SDPA.
    assert flex_rows and max(flex_rows) * 4 < attention.FLEX_DECODING_ROWS
    assert sdpa_rows and min(sdpa_rows) * 4 >= attention.FLEX_DECODING_ROWS

