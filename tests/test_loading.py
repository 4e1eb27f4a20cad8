"""ld.load_model's input checks: what is wrong is said, before transformers blames something else."""

from __future__ import annotations

import pytest
import torch
import transformers

import lookahead_decoding as ld


def save_tiny_llama(folder, weights: bool = True):
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2)
    if weights:
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)


def test_empty_folder_holds_no_model(tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path} holds no model: it has no config.json$"):
        ld.load_model(tmp_path)


def test_folder_with_a_gguf_file_points_to_it(tmp_path):
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=f"no config.json; to load the GGUF file in it, pass {tmp_path}/model.Q8_0.gguf$"):
        ld.load_model(str(tmp_path))


def test_folder_without_weights(tmp_path):
    save_tiny_llama(tmp_path, weights=False)
    with pytest.raises(ValueError, match=f"^{tmp_path} holds no model weights: it has no \\*.safetensors or \\*.bin file$"):
        ld.load_model(tmp_path)


def test_folder_without_tokenizer(tmp_path):
    save_tiny_llama(tmp_path)
    with pytest.raises(ValueError, match=f"^{tmp_path} holds no tokenizer: it has none of tokenizer.json, "):
        ld.load_model(tmp_path)


@pytest.mark.parametrize("path", ["", "   "])
def test_empty_path_is_not_the_current_folder(path):
    with pytest.raises(ValueError, match="^the model path is empty; pass a model folder, a .gguf file or a Hub name$"):
        ld.load_model(path)


def test_path_of_the_wrong_type():
    with pytest.raises(TypeError, match="^path must be a str or a pathlib.Path, got NoneType$"):
        ld.load_model(None)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_non_floating_dtype(tmp_path, dtype):
    with pytest.raises(ValueError, match=f"^dtype must be a floating-point type such as float32, bfloat16, float16, got {dtype}$"):
        ld.load_model(tmp_path, dtype=dtype)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps(tmp_path):
    with pytest.raises(ValueError, match="^device 'mps' was asked for but MPS is not available on this machine$"):
        ld.load_model(tmp_path, device="mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="^device 'cuda:1' was asked for but CUDA is not available on this machine$"):
        ld.load_model(tmp_path, device="cuda:1")


def test_unknown_device(tmp_path):
    with pytest.raises(ValueError, match="^unknown device 'gpu'; use auto, cpu, cuda or mps$"):
        ld.load_model(tmp_path, device="gpu")
