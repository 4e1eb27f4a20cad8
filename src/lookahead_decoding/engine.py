"""The fast engine: the fused greedy step with fixed shapes over a preallocated static KV cache.

Everything a step does — building the mask, the forward, verification and moving the winner's KV into place —
is a device op on fixed-shape buffers, with the cache length kept as a device tensor. On CUDA the step is
therefore captured once as a CUDA graph and replayed: one host-to-device copy of the step's ids, one replay,
one device-to-host copy of the outcome. The prompt goes in as fixed-size chunks through a second graph.
Elsewhere the same functions run eagerly, with identical results.

With window=1, ngram=2, guesses=0 the step is plain autoregressive decoding on the same engine (`ar-graph` in
the benchmarks), so lookahead can be compared against an equally optimised baseline.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Sequence

import torch
from transformers import StaticCache

from .config import LookaheadConfig
from .model_adapter import ModelAdapter, UnsupportedModelError
from .drafting.tree import TokenTree
from .layout import tree_tensors
from .step import StepOutcome, build_layouts, host_predictions, top_predictions, tree_parents
from .verification import verify_greedy

# Prompt tokens per prefill chunk. The prefill runs as fixed-shape chunks so that it, too, is one captured graph
# (an eager forward of each new prompt length pays launches and kernel selection; docs/benchmarks.md).
PREFILL_CHUNK = 128


class Replayable:
    """A device function with fixed shapes, run eagerly or captured once as a CUDA graph and replayed."""

    def __init__(self, fn) -> None:
        self.fn, self.graph, self.output = fn, None, None

    def capture(self, restore) -> None:
        """Record `fn` as a CUDA graph after warm-up runs (on a side stream, as capture requires); `restore`
        undoes what each run did to the cache."""
        # Python's garbage collector must not run while a stream captures: collecting an engine that nobody holds
        # any more (calibration builds several) destroys its graphs, which CUDA forbids during a capture.
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.fn()
                    restore()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.fn()
            restore()
        finally:
            if collecting:
                gc.enable()

    def __call__(self):
        """`fn`'s outputs (on replay, the graph's output buffers: read them before the next call)."""
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.output


def check_max_length(max_length) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (prompt + new tokens), got {max_length!r}")


class StaticStep:
    """A `StepRunner` for greedy decoding of sequences up to `max_length` tokens (prompt + new tokens).

    `shapes` is one `LookaheadConfig` or several: every shape gets its own fixed-shape step (and graph) over the
    one static cache, and the decoding loop picks a shape per step.
    """

    def __init__(
        self, model, shapes: LookaheadConfig | Sequence[LookaheadConfig], max_length: int,
        cuda_graph: bool | None = None, compile: bool = False, prefill_chunk: int = PREFILL_CHUNK,
        predictions: int = 0,
    ) -> None:
        """cuda_graph: capture the steps and the prefill as CUDA graphs (default: on CUDA devices). compile: fuse
        each step's kernels with torch.compile first (slow to start; worth it for long runs). prefill_chunk:
        prompt tokens per prefill forward. predictions: how many of the model's top next tokens to report at
        every computed row (0: none)."""
        adapter = ModelAdapter(model)
        if adapter.sliding_window is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses sliding-window attention, which the static engine does not support; "
                "use lookahead_decoding.generate (dynamic cache) instead"
            )
        check_max_length(max_length)
        if adapter.context_length is not None and max_length > adapter.context_length:
            raise ValueError(f"max_length {max_length} exceeds the model's context length of {adapter.context_length}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        device = adapter.device
        shapes = (shapes,) if isinstance(shapes, LookaheadConfig) else tuple(shapes)
        self.adapter, self.layouts = adapter, build_layouts(shapes, device)
        self.max_length, self.prefill_chunk, self.predictions = max_length, prefill_chunk, predictions
        largest = max(layout.size for layout in self.layouts)
        # A step's rows, or a padded prefill chunk, are written after the last committed token: spare slots.
        cache_length = max_length + max(largest, prefill_chunk, max(s.candidate_length for s in shapes) + 1)
        self.cache = StaticCache(config=model.config, max_cache_len=cache_length)
        self.key_index = torch.arange(cache_length, device=device)
        # Per shape: step ids, the tree's parents, then its number of real nodes.
        sizes = [layout.size + layout.config.tree_nodes + 1 for layout in self.layouts]
        self.inputs = [torch.zeros(size, dtype=torch.long, device=device) for size in sizes]
        self.host_inputs = [torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda") for size in sizes]
        self.chunk_inputs = torch.zeros(prefill_chunk + 1, dtype=torch.long, device=device)  # ids, then #real ids
        self.chunk_inputs[prefill_chunk] = 1  # so that capture's warm-up runs read the logits of a real row
        self.chunk_offsets = torch.arange(prefill_chunk, device=device)
        self.chunk_allowed = self.chunk_offsets[:, None] >= self.chunk_offsets[None, :]  # causal within the chunk
        self.last_position = (adapter.context_length or 2**62) - 1
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        steps = [functools.partial(self._device_step, shape) for shape in range(len(self.layouts))]
        self.run_step = [Replayable(torch.compile(fn, dynamic=False) if compile else fn) for fn in steps]
        self.run_prefill_chunk = Replayable(self._device_prefill_chunk)

    @property
    def captured(self) -> bool:
        return self.run_prefill_chunk.graph is not None

    def capture(self) -> None:
        """Capture every step shape and the prefill as CUDA graphs now (otherwise the first prefill does it)."""
        if self.adapter.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this engine's model is on {self.adapter.device}")
        self.use_graph = True
        if not self.captured:
            with torch.inference_mode():
                self.prefill(torch.zeros(1, dtype=torch.long, device=self.adapter.device), [0])

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> StepOutcome:
        length, chunk = prompt.numel(), self.prefill_chunk
        if length >= self.max_length:
            raise ValueError(f"the prompt ({length} tokens) does not fit this engine's max_length {self.max_length}")
        self.cache.reset()
        for begin in range(0, length, chunk):
            ids = prompt[begin : begin + chunk]
            self.chunk_inputs[: ids.numel()].copy_(ids)
            self.chunk_inputs[chunk].fill_(ids.numel())
            first, scores = self.run_prefill_chunk()
        if self.use_graph and not self.captured:
            self._capture()  # only now: the cache allocates its buffers on first use
        return StepOutcome(0, 0, [int(first)], [], scores)

    def step(self, shape: int, step_ids: list[int], tree: TokenTree, history: Sequence[int]) -> StepOutcome:
        if len(history) > self.max_length:  # the static cache has no room for the step's rows
            raise ValueError(f"generation ran past this engine's max_length {self.max_length}")
        layout = self.layouts[shape]
        host = self.host_inputs[shape]
        host[:-1] = torch.tensor(step_ids + tree_parents(tree, layout.config.tree_nodes))
        host[-1] = len(tree)
        self.inputs[shape].copy_(host, non_blocking=True)
        packed, scores, top = self.run_step[shape]()
        predictions = host_predictions(*top) if self.predictions else None
        return StepOutcome.from_host(packed.tolist(), layout.config, scores, predictions)

    def _cached_length(self) -> torch.Tensor:
        return self.cache.layers[0].cumulative_length

    def _set_cached_length(self, length: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(length)

    def _attention_mask(self, start: torch.Tensor, positions: torch.Tensor, allowed_in_block: torch.Tensor):
        """Rows of a block written at `start` see the whole cache before it and, inside the block, what
        `allowed_in_block` [rows, rows] says."""
        rows = allowed_in_block.shape[0]
        relative = self.key_index - start
        in_block = (relative >= 0) & (relative < rows)
        allowed = (relative < 0) | (in_block & allowed_in_block[:, relative.clamp(0, rows - 1)])
        return self.adapter.attention_mask(allowed, positions, None)

    def _device_prefill_chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one chunk of prompt tokens (padded to the chunk size) to the cache; the argmax after its last
        real token, and its logits [1, V]. Padding rows only write cache slots past the new length, which later
        writes replace."""
        chunk = self.prefill_chunk
        ids, count = self.chunk_inputs[:chunk], self.chunk_inputs[chunk]
        start = self._cached_length().clone()
        positions = (self.chunk_offsets + start).clamp(max=self.last_position)
        mask = self._attention_mask(start, positions, self.chunk_allowed)
        logits = self.adapter.forward(ids, positions, mask, self.cache, (count - 1).view(1))
        self._set_cached_length(start + count)
        return logits[0].argmax(), logits[:1]

    def _device_step(self, shape: int):
        """(the packed outcome as `StepOutcome.from_host` reads it, the logits [K+1, V] along the accepted path,
        the top predictions (row tokens, top tokens, probabilities) or None)"""
        layout = self.layouts[shape]
        config = layout.config
        size, nodes, depth = layout.size, config.tree_nodes, config.candidate_length  # depth: K
        inputs = self.inputs[shape]
        step_ids, parents, num_nodes = inputs[:size], inputs[size : size + nodes], inputs[size + nodes]
        tree = tree_tensors(step_ids[layout.tree_rows], parents, num_nodes, depth)
        start = self._cached_length().clone()  # tokens cached before this step; the current token sits there
        positions = (layout.positions(tree) + start).clamp(max=self.last_position)
        mask = self._attention_mask(start, positions, layout.allowed(tree))

        logits = self.adapter.forward(step_ids, positions, mask, self.cache, layout.logit_rows)
        preds = logits.argmax(dim=-1)
        result = verify_greedy(preds[0], preds[layout.tree_logits], tree, depth)

        # Keep the current token and the accepted path: move the path's KV right behind the current token (all K
        # rows, so the shape is fixed) and set the length to what was committed.
        accepted, path = result[0], result[2 + depth :]
        committed_logits = logits[:1]
        if nodes > 0:
            committed_logits = torch.cat([committed_logits, logits[layout.tree_logits][path]])
            source = start + layout.lookahead_size + path
            target = start + 1 + torch.arange(depth, device=path.device)
            for layer in self.cache.layers:
                layer.keys.index_copy_(2, target, layer.keys.index_select(2, source))
                layer.values.index_copy_(2, target, layer.values.index_select(2, source))
        self._set_cached_length(start + 1 + accepted)
        top = None
        if self.predictions:
            top = (step_ids[layout.logit_rows], *top_predictions(logits, self.predictions))
        return torch.cat([result, preds[layout.new_level_logits]]), committed_logits, top

    def _capture(self) -> None:
        """Record the steps and the prefill chunk as CUDA graphs; warm-up runs leave the cache as they found it."""
        saved = self._cached_length().clone()
        for replayable in (*self.run_step, self.run_prefill_chunk):
            replayable.capture(lambda: self._set_cached_length(saved))
