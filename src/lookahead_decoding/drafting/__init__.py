"""Candidate sources and the token tree their drafts are merged into."""

from .base import CandidateSource, CombinedSource, Draft, ModelPredictions
from .memory import DraftMemory, MemorySource
from .ngram_pool import NGramPool
from .pool import NGramPoolSource
from .recycling import RecycledTopKSource
from .suffix import SuffixSource
from .tree import TokenTree, build_tree

__all__ = ["CandidateSource", "CombinedSource", "Draft", "DraftMemory", "MemorySource", "ModelPredictions", "NGramPool",
           "NGramPoolSource", "RecycledTopKSource", "SuffixSource", "TokenTree", "build_tree"]
