"""Lookahead decoding: exact, draft-free parallel decoding for HF decoder-only models.

The public names are imported from their submodules on first use, so that importing the package (as the command
line does before parsing its arguments) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_EXPORTS = {
    "BatchScheduler": "scheduler",
    "CandidateSource": "drafting",
    "CombinedSource": "drafting",
    "Draft": "drafting",
    "DraftMemory": "drafting",
    "GenerationStats": "state",
    "LookaheadConfig": "config",
    "LookaheadOutput": "decoding",
    "MemorySource": "drafting",
    "NGramPoolSource": "drafting",
    "RecycledTopKSource": "drafting",
    "Request": "scheduler",
    "RowOutput": "decoding",
    "SuffixSource": "drafting",
    "ProcessedGreedyVerifier": "sampling",
    "SamplingParams": "sampling_params",
    "SamplingVerifier": "sampling",
    "StaticStep": "engine",
    "StepPlan": "tuning",
    "UnsupportedModelError": "model_adapter",
    "default_model_path": "models",
    "generate": "decoding",
    "load_default_model": "models",
    "load_model": "models",
    "lookahead_generate": "hf_integration",
}

__all__ = sorted(_EXPORTS)


def lazy_exports(package: str, exports: dict[str, str]):
    """(__getattr__, __dir__) for `package`, whose public names (name -> submodule) are imported on first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from .config import LookaheadConfig
    from .decoding import LookaheadOutput, RowOutput, generate
    from .state import GenerationStats
    from .drafting import (CandidateSource, CombinedSource, Draft, DraftMemory, MemorySource, NGramPoolSource,
                           RecycledTopKSource, SuffixSource)
    from .engine import StaticStep
    from .tuning import StepPlan
    from .hf_integration import lookahead_generate
    from .model_adapter import UnsupportedModelError
    from .models import default_model_path, load_default_model, load_model
    from .scheduler import BatchScheduler, Request
    from .sampling import ProcessedGreedyVerifier, SamplingVerifier
    from .sampling_params import SamplingParams
