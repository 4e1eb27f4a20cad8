"""The benchmark suite behind `lookahead bench`: data loaders, an open registry of decoding methods, the
interleaved runner, the batched runner, and reports (markdown, JSON, plots). The core library never imports this
package.

Names are imported from their submodules on first use: `lookahead bench --help` goes through this package and
must not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import lazy_exports

# Public name -> the submodule that defines it.
_EXPORTS = {
    "BATCHED_METHODS": "methods",
    "DATASETS": "data",
    "METHODS": "methods",
    "Prompt": "data",
    "add_bench_parser": "cli",
    "bench": "runner",
    "bench_batched": "batched",
    "count_forwards": "methods",
    "hf_generate": "methods",
    "load_file": "data",
    "load_hub": "data",
    "load_prompts": "data",
    "lookahead_with": "methods",
    "main": "cli",
    "register_method": "methods",
    "summarize": "runner",
    "sweep": "runner",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from .batched import bench_batched
    from .cli import add_bench_parser, main
    from .data import DATASETS, Prompt, load_file, load_hub, load_prompts
    from .methods import BATCHED_METHODS, METHODS, count_forwards, hf_generate, lookahead_with, register_method
    from .runner import bench, summarize, sweep
