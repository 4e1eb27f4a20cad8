"""Lookahead decoding: exact, draft-free parallel decoding for HF decoder-only models."""

from .config import LookaheadConfig
from .decoding import GenerationStats, LookaheadOutput, generate
from .drafting import CandidateSource, NGramPoolSource
from .engine import StaticStep
from .hf_integration import lookahead_generate
from .model_adapter import UnsupportedModelError
from .models import default_model_path, load_default_model, load_model
from .sampling import ProcessedGreedyVerifier, SamplingVerifier

__all__ = [
    "CandidateSource",
    "GenerationStats",
    "LookaheadConfig",
    "LookaheadOutput",
    "NGramPoolSource",
    "ProcessedGreedyVerifier",
    "SamplingVerifier",
    "StaticStep",
    "UnsupportedModelError",
    "default_model_path",
    "generate",
    "load_default_model",
    "load_model",
    "lookahead_generate",
]
