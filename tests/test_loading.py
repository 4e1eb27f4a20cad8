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


def same_loaded_model(a, b) -> bool:
    """Weights, config (but for the quantisation note of a GGUF load), generation config, name and tokenizer."""
    (model_a, tokenizer_a), (model_b, tokenizer_b) = a, b
    weights_a, weights_b = model_a.state_dict(), model_b.state_dict()
    configs = [model.config.to_dict() for model in (model_a, model_b)]
    for config in configs:
        config.pop("quantization_config", None)
    text = "Hello <|im_start|> world\n\n  déjà vu 123"
    return (weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
            and configs[0] == configs[1] and model_a.generation_config == model_b.generation_config
            and model_a.name_or_path == model_b.name_or_path
            and tokenizer_a(text).input_ids == tokenizer_b(text).input_ids
            and tokenizer_a.chat_template == tokenizer_b.chat_template
            and tokenizer_a.all_special_tokens == tokenizer_b.all_special_tokens)


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_and_loads_as_itself(tmp_path, monkeypatch, caplog):
    """The first load keeps a float32 model folder in the cache directory, and every load (from the GGUF file
    itself where the cache cannot be written, or converted again where its folder is damaged) gives the same
    model and tokenizer."""
    from lookahead_decoding import models

    gguf = tmp_path / "model.gguf"  # a copy: its own conversion, not the session's
    gguf.write_bytes(ld.default_model_path().read_bytes())
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level("WARNING", logger="lookahead_decoding.models"):
        direct = ld.load_model(gguf)
    assert "could not keep the converted GGUF model" in caplog.text and "LOOKAHEAD_CACHE_DIR" in caplog.text
    assert direct[0].name_or_path == str(tmp_path)
    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(tmp_path / "cache"))
    folder = models.converted_folder(gguf)
    assert not folder.exists()
    assert same_loaded_model(ld.load_model(gguf), direct)
    assert sorted(path.name for path in folder.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert same_loaded_model(ld.load_model(gguf), direct)  # from the folder
    (folder / "model.safetensors").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lookahead_decoding.models"):
        assert same_loaded_model(ld.load_model(gguf), direct)
    assert "does not load" in caplog.text and (folder / "model.safetensors").is_file()
