"""The benchmark suite behind `lookahead bench`: data loaders, an open registry of decoding methods, the
interleaved runner, and reports (markdown, JSON, plots). The core library never imports this package."""

from .cli import add_bench_parser, main
from .data import DATASETS, Prompt, load_file, load_hub, load_prompts, read_jsonl
from .methods import METHODS, count_forwards, hf_generate, lookahead_with, register_method
from .runner import bench, summarize, sweep

__all__ = [
    "DATASETS",
    "METHODS",
    "Prompt",
    "add_bench_parser",
    "bench",
    "count_forwards",
    "hf_generate",
    "load_file",
    "load_hub",
    "load_prompts",
    "lookahead_with",
    "main",
    "read_jsonl",
    "register_method",
    "summarize",
    "sweep",
]
