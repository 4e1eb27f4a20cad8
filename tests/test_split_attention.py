"""The split-KV kernel (split_attention.py) against SDPA, run in Triton's interpreter on the CPU, in float32: the
interpreter's bf16 dot products are wrong (its numpy has no bf16), so bf16 is tested on CUDA (tests/test_gpu.py)."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lookahead_decoding as ld
from lookahead_decoding import split_attention
from lookahead_decoding.attention import fold_mask, folded_gqa_attention
from lookahead_decoding.engine import StaticStep

from conftest import greedy_reference, tiny_model

pytestmark = pytest.mark.skipif(split_attention.triton is None, reason="needs Triton")


def reference(query, key, value, mask, scaling):
    """transformers' attention: K and V repeated per query head, SDPA under the unfolded mask."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.sampled_from([1, 3, 4]),
       length=st.sampled_from([1, 2, 5, 17, 40]), dim=st.sampled_from([8, 16, 24, 64]), slots=st.integers(1, 200),
       mask_kind=st.sampled_from(["additive", "folded", "boolean", "shared"]), seed=st.integers(0, 2**16))
def test_matches_sdpa(batch, kv_heads, groups, length, dim, slots, mask_kind, seed):
    """Any number of folded rows (up to 160: three programs' worth per span), heads, slots and mask layout."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, length, dim, generator=generator)
    key = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    value = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    allowed = torch.rand(1 if mask_kind == "shared" else batch, 1, length, slots, generator=generator) < 0.7
    allowed[..., 0] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = {"boolean": allowed, "folded": fold_mask(additive, groups)}.get(mask_kind, additive)
    expected = reference(query, key, value, additive.expand(batch, -1, -1, -1), 0.3)
    torch.testing.assert_close(split_attention.split_kv_attention(query, key, value, mask, 0.3), expected)


def test_rows_with_nothing_allowed_average_the_cache_like_sdpa():
    """The engine's additive mask uses the dtype's minimum, not -inf: a row allowed nothing (an idle batch row)
    weighs every slot alike, as SDPA does, rather than turning into NaN."""
    query, key, value = torch.randn(1, 2, 2, 16), torch.randn(1, 1, 130, 16), torch.randn(1, 1, 130, 16)
    mask = torch.full((1, 1, 2, 130), torch.finfo(torch.float32).min)
    mask[0, 0, 0, :5] = 0.0
    expected = reference(query, key, value, mask, None)
    torch.testing.assert_close(split_attention.split_kv_attention(query, key, value, mask, None), expected)
    torch.testing.assert_close(expected[0, 1], value[0, 0].mean(0).expand(2, 16))


def test_the_folded_sdpa_agrees():
    """Both of `attention.py`'s paths compute one attention."""
    query, key, value = torch.randn(2, 6, 3, 32), torch.randn(2, 2, 70, 32), torch.randn(2, 2, 70, 32)
    mask = torch.zeros(2, 1, 3, 70).masked_fill(torch.rand(2, 1, 3, 70) < 0.3, torch.finfo(torch.float32).min)
    torch.testing.assert_close(split_attention.split_kv_attention(query, key, value, mask, None),
                               folded_gqa_attention(query, key, value, mask, None))


def test_a_mask_folded_for_other_heads_reads_its_first_rows():
    """A model whose layers fold differently hands every layer one mask: its first Q rows are the mask."""
    query, key, value = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    mask = torch.zeros(1, 1, 3, 70).masked_fill(torch.rand(1, 1, 3, 70) < 0.3, torch.finfo(torch.float32).min)
    torch.testing.assert_close(split_attention.split_kv_attention(query, key, value, fold_mask(mask, 5), None),
                               reference(query, key, value, mask, None))


def test_applies_only_to_few_rows_on_its_devices(monkeypatch):
    query, key = torch.randn(1, 4, 16, 256), torch.randn(1, 1, 40, 256)
    mask = torch.zeros(1, 1, 16, 40)
    assert not split_attention.applies(query, key, mask)  # the CPU is not among its devices
    monkeypatch.setattr(split_attention, "DEVICES", ("cpu",))
    assert split_attention.applies(query, key, mask)  # 4 · 16 = 64 folded rows of 256 dims: 16,384
    assert not split_attention.applies(torch.randn(1, 4, 17, 256), key, torch.zeros(1, 1, 17, 40))
    assert split_attention.applies(torch.randn(1, 4, 64, 64), key[..., :64], torch.zeros(1, 1, 64, 40))  # 256 rows
    assert not split_attention.applies(torch.randn(1, 4, 65, 64), key[..., :64], torch.zeros(1, 1, 65, 40))
    assert not split_attention.applies(query, key, torch.zeros(1, 1, 16, 41))
    assert not split_attention.applies(query, key, torch.zeros(1, 1, 16, 40, dtype=torch.long))


def test_cuda_devices_before_ampere_keep_sdpa(monkeypatch):
    """Triton's bf16 dot products need compute capability 8.0 (a T4 or V100 would fail deep inside Triton)."""
    capabilities = {0: 7, 1: 8, 2: 9}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(major=capabilities[device.index]))
    assert [split_attention.capable(torch.device("cuda", index)) for index in range(3)] == [False, True, True]
    assert split_attention.capable(torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("static", [False, True])
def test_lookahead_through_the_kernel_matches_greedy(arch, static, monkeypatch):
    """Lookahead's steps and plain ones, a batch of two, on the kernel wherever it applies, on the CPU's runner and
    on the static engine (whose steps read only the cache's first slots): the same tokens as greedy on SDPA. One
    span per (row, KV head): the combining kernel, whose many programs are slow in Triton's interpreter, is checked
    against SDPA in the tests above."""
    model = tiny_model(arch, seed=5)
    prompts = [[5, 9, 2, 11, 5, 9, 2], [7, 7, 3, 1]]
    expected = [greedy_reference(model, torch.tensor([prompt]), 20)[0].tolist() for prompt in prompts]
    monkeypatch.setattr(split_attention, "DEVICES", ("cpu",))
    monkeypatch.setattr(split_attention, "PROGRAMS_WANTED", 1)
    kernel_calls = []
    kernel = split_attention.split_kv_attention
    monkeypatch.setattr(split_attention, "split_kv_attention", lambda *args: kernel_calls.append(1) or kernel(*args))
    config = ld.LookaheadConfig(window=4, ngram=3, guesses=3)
    runner = StaticStep(model, config, 64, batch_size=2) if static else None
    out = ld.generate(model, prompts, max_new_tokens=20, config=config, runner=runner)
    assert kernel_calls
    assert [sequence[-len(row):].tolist() for sequence, row in zip(out.sequences, expected)] == expected  # left-padded
