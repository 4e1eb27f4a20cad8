"""Shared fixtures: tiny randomly initialised decoder-only models of every supported architecture."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton's kernels (split_attention.py) run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

import lookahead_decoding as ld  # noqa: E402
from lookahead_decoding import engine  # noqa: E402
from lookahead_decoding.drafting import CandidateSource, Draft  # noqa: E402

torch.set_num_threads(1)  # tiny models on 2 cores: intra-op threads only add contention

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# Architecture name -> (config class, model class, config kwargs). Sliding windows are kept short so that
# the exactness tests cross them.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, "sliding_window": 24}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, "head_dim": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, "num_key_value_heads": 4}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            max_position_embeddings=256)),
}


CLI_MODEL_CONTEXT = 512


@pytest.fixture(autouse=True, scope="session")
def calibration_cache(tmp_path_factory):
    """Calibrations of test models go to a throwaway cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOKAHEAD_CACHE_DIR", str(tmp_path_factory.mktemp("calibration")))
        yield


def cache_sharing_models(folder: Path) -> str:
    """A LOOKAHEAD_CACHE_DIR of a test's own (its calibrations kept apart) that shares the session's converted GGUF
    models (`models.converted_folder`), which would take a process 25 s to convert again."""
    shared = Path(os.environ["LOOKAHEAD_CACHE_DIR"]) / "gguf"
    shared.mkdir(parents=True, exist_ok=True)
    (folder / "gguf").symlink_to(shared, target_is_directory=True)
    return str(folder)


@pytest.fixture(autouse=True, scope="session")
def narrow_attention_widths():
    """Engines read the cache through widths from 16 slots (256 by default), so that the tiny sequences of these
    tests cross several of them and every exactness test covers the switch from one width to the next."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "NARROWEST_WIDTH", 16)
        yield


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, seed: int = 0, attn_implementation: str | None = None):
    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    attn_implementation = attn_implementation or ("eager" if arch == "gemma2" else "sdpa")
    config = getattr(transformers, config_cls)(**kwargs, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation=attn_implementation).eval()
    # No EOS and no pad token: HF would otherwise mask prompt tokens equal to the pad id.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    return model


@functools.lru_cache(maxsize=None)
def real_vocabulary_model():
    """A tiny Llama with a real model's vocabulary (SmolLM2's 49,152 tokens), on which top-k and top-p take the
    paths they take for real models: compiled, a scan over the sorted vocabulary once failed to generate on CUDA,
    and a host sync once split the step (`row_sampler.cumulative_sum`, `RowSampler._top_k_top_p`)."""
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": 49152}, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    return model


def greedy_reference(model, input_ids, max_new_tokens, **kwargs):
    return model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def cli_model(tmp_path_factory) -> str:
    """A model folder for the command line: the SmolLM2 tokenizer and a 2-layer random Llama of context 512."""
    _, tokenizer = ld.load_default_model()  # converted once for the session (its later loads take a second)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=CLI_MODEL_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class OracleSource(CandidateSource):
    """Proposes the true greedy continuation, behind `decoys` wrong branches that look likelier to the tree."""

    def __init__(self, reference: Sequence[int], decoys: int = 0) -> None:
        self.reference, self.decoys = list(reference), decoys

    def propose(self, history, max_length, budget):
        guess = tuple(self.reference[len(history) : len(history) + max_length])
        guess += (0,) * (max_length - len(guess))
        # Decoys share the true path's first i tokens and then go wrong, so the tree branches at every depth.
        decoys = [Draft(guess[:i] + ((guess[i] + 1) % VOCAB,), (1.0,) * (i + 1))
                  for i in range(min(self.decoys, max_length))]
        return decoys + [Draft(guess, (1.0,) * (max_length - 1) + (0.5,))]
