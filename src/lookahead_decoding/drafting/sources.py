"""Which candidate sources a generation uses: given ones, named ones, or the default."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import LookaheadConfig
from .base import CandidateSource, CombinedSource, NoDrafts
from .memory import DraftMemory, MemorySource
from .ngram_pool import NGramPool
from .pool import NGramPoolSource
from .recycling import RecycledTopKSource
from .suffix import SuffixSource

SOURCE_NAMES = ("pool", "suffix", "recycled")
DEFAULT_SOURCES = ("pool", "suffix", "recycled")


def pool_source(shapes: Sequence[LookaheadConfig]) -> NGramPoolSource:
    """The n-gram pool the window of `shapes` feeds: n-grams as long as the widest window's, G per key."""
    windows = [shape for shape in shapes if shape.has_window]
    length = max((shape.levels for shape in windows), default=max(shape.candidate_length for shape in shapes))
    capacity = max(shape.guesses for shape in shapes)
    from_text = any(shape.pool_from_prompt for shape in shapes if shape.verifies)
    return NGramPoolSource(NGramPool(length, capacity), from_text=from_text)


def named_source(name: str, shapes: Sequence[LookaheadConfig], memory: DraftMemory | None = None
                 ) -> CandidateSource:
    """The source called `name`; with a `memory`, the recycled source keeps its table in the memory."""
    if name == "pool":
        return pool_source(shapes)
    if name == "suffix":
        return SuffixSource()
    if name == "recycled":
        return RecycledTopKSource(table=None if memory is None else memory.recycled)
    raise ValueError(f"unknown candidate source {name!r}; the sources are {', '.join(SOURCE_NAMES)}")


def make_source(source, shapes: Sequence[LookaheadConfig], predictions: int | None = None,
                memory: DraftMemory | None = None) -> CandidateSource:
    """A CandidateSource from `source`: None (the default sources), a CandidateSource, a name in SOURCE_NAMES, or
    a sequence of those (combined into one tree). `predictions`: how many of the model's top next tokens the step
    runner reports, when it is fixed already; default sources that need more are left out. Where no shape
    verifies the host's drafts (plain decoding, or drafting on the device), the default is no source at all. A
    `memory` adds its `MemorySource` to the sources, and carries the recycled source's table."""
    if source is None and not any(shape.host_drafts for shape in shapes):
        return NoDrafts()
    if source is None:
        parts = [named_source(name, shapes, memory) for name in DEFAULT_SOURCES]
        parts = [s for s in parts if predictions is None or s.predictions_wanted <= predictions]
    else:
        given = [source] if isinstance(source, (str, CandidateSource)) else source
        if not (isinstance(given, Sequence) and given and all(isinstance(s, (str, CandidateSource)) for s in given)):
            raise TypeError(f"source must be a CandidateSource, one of {', '.join(SOURCE_NAMES)} or a non-empty "
                            f"list of those, got {source!r}")
        parts = [s if isinstance(s, CandidateSource) else named_source(s, shapes, memory) for s in given]
    if memory is not None:
        parts.append(MemorySource(memory))
    return parts[0] if len(parts) == 1 else CombinedSource(parts)
