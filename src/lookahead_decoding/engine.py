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

from collections.abc import Sequence

import torch
from transformers import StaticCache

from .config import LookaheadConfig
from .layout import StepLayout
from .model_adapter import ModelAdapter, UnsupportedModelError
from .verification import verify_greedy

AUTOREGRESSIVE = LookaheadConfig(window=1, ngram=2, guesses=0, pool_from_prompt=False)

# Prompt tokens per prefill chunk. The prefill runs as fixed-shape chunks so that it, too, is one captured graph:
# an eager forward of a new prompt length cost ~67 ms on the H200 (launches, and kernel selection per shape),
# as much as 25 lookahead steps.
PREFILL_CHUNK = 128


class Replayable:
    """A device function with fixed shapes, run eagerly or captured once as a CUDA graph and replayed."""

    def __init__(self, fn) -> None:
        self.fn, self.graph, self.output = fn, None, None

    def capture(self, restore) -> None:
        """Record `fn` as a CUDA graph after warm-up runs (on a side stream, as capture requires); `restore`
        undoes what each run did to the cache."""
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

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.output


class StaticStep:
    """A `StepRunner` for greedy decoding of sequences up to `max_length` tokens (prompt + new tokens)."""

    def __init__(
        self, model, config: LookaheadConfig, max_length: int, cuda_graph: bool | None = None, compile: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        """cuda_graph: capture the step and the prefill as CUDA graphs (default: on CUDA devices). compile: fuse
        the step's kernels with torch.compile first (slow to start; worth it for long runs). prefill_chunk:
        prompt tokens per prefill forward."""
        adapter = ModelAdapter(model)
        if adapter.sliding_window is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses sliding-window attention, which the static engine does not support; "
                "use lookahead_decoding.generate (dynamic cache) instead"
            )
        if adapter.context_length is not None and max_length > adapter.context_length:
            raise ValueError(f"max_length {max_length} exceeds the model's context length of {adapter.context_length}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        device = adapter.device
        self.adapter, self.layout = adapter, StepLayout.build(config, device)
        self.max_length, self.prefill_chunk = max_length, prefill_chunk
        size = self.layout.size
        # A step's rows, or a padded prefill chunk, are written after the last committed token: spare slots.
        cache_length = max_length + max(size, prefill_chunk)
        self.cache = StaticCache(config=model.config, max_cache_len=cache_length)
        self.key_index = torch.arange(cache_length, device=device)
        self.inputs = torch.zeros(size + 1, dtype=torch.long, device=device)  # step ids, then #candidates
        self.host_inputs = torch.zeros(size + 1, dtype=torch.long, pin_memory=device.type == "cuda")
        self.chunk_inputs = torch.zeros(prefill_chunk + 1, dtype=torch.long, device=device)  # ids, then #real ids
        self.chunk_inputs[prefill_chunk] = 1  # so that capture's warm-up runs read the logits of a real row
        self.chunk_offsets = torch.arange(prefill_chunk, device=device)
        self.chunk_allowed = self.chunk_offsets[:, None] >= self.chunk_offsets[None, :]  # causal within the chunk
        self.last_position = (adapter.context_length or 2**62) - 1
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.run_step = Replayable(torch.compile(self._device_step, dynamic=False) if compile else self._device_step)
        self.run_prefill_chunk = Replayable(self._device_prefill_chunk)

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> int:
        length, chunk = prompt.numel(), self.prefill_chunk
        if length >= self.max_length:
            raise ValueError(f"the prompt ({length} tokens) does not fit this engine's max_length {self.max_length}")
        self.cache.reset()
        for begin in range(0, length, chunk):
            ids = prompt[begin : begin + chunk]
            self.chunk_inputs[: ids.numel()].copy_(ids)
            self.chunk_inputs[chunk].fill_(ids.numel())
            first = self.run_prefill_chunk()
        if self.use_graph and self.run_step.graph is None:
            self._capture()  # only now: the cache allocates its buffers on first use
        return int(first)

    def step(self, step_ids: list[int], num_candidates: int, history: Sequence[int]) -> list[int]:
        if len(history) > self.max_length:  # the static cache has no room for the step's rows
            raise ValueError(f"generation ran past this engine's max_length {self.max_length}")
        self.host_inputs[:-1] = torch.tensor(step_ids)
        self.host_inputs[-1] = num_candidates
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        return self.run_step().tolist()

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

    def _device_prefill_chunk(self) -> torch.Tensor:
        """Append one chunk of prompt tokens (padded to the chunk size) to the cache; the argmax after its last
        real token. Padding rows only write cache slots past the new length, which later writes replace."""
        chunk = self.prefill_chunk
        ids, count = self.chunk_inputs[:chunk], self.chunk_inputs[chunk]
        start = self._cached_length().clone()
        positions = (self.chunk_offsets + start).clamp(max=self.last_position)
        mask = self._attention_mask(start, positions, self.chunk_allowed)
        logits = self.adapter.forward(ids, positions, mask, self.cache, (count - 1).view(1))
        self._set_cached_length(start + count)
        return logits[0].argmax()

    def _device_step(self) -> torch.Tensor:
        layout, config = self.layout, self.layout.config
        size, guesses, k = layout.size, config.guesses, config.candidate_length
        step_ids, num_candidates = self.inputs[:size], self.inputs[size]
        start = self._cached_length().clone()  # tokens cached before this step; the current token sits there
        positions = (layout.position_offsets + start).clamp(max=self.last_position)
        mask = self._attention_mask(start, positions, layout.allowed)

        logits = self.adapter.forward(step_ids, positions, mask, self.cache, layout.logit_rows)
        preds = logits.argmax(dim=-1)
        candidates = step_ids[layout.lookahead_size :].view(guesses, k)
        valid = torch.arange(guesses, device=preds.device) < num_candidates
        result = verify_greedy(preds[0], candidates, preds[1 + config.window :].view(guesses, k), valid)

        # Keep the current token and the winner's accepted tokens: move the winner's KV right behind the
        # current token (all K rows, so the shape is fixed) and set the length to what was committed.
        accepted, winner = result[0], result[1]
        offsets = torch.arange(k, device=preds.device)
        source = start + layout.lookahead_size + winner * k + offsets
        target = start + 1 + offsets
        if guesses > 0:
            for layer in self.cache.layers:
                layer.keys.index_copy_(2, target, layer.keys.index_select(2, source))
                layer.values.index_copy_(2, target, layer.values.index_select(2, source))
        self._set_cached_length(start + 1 + accepted)
        return torch.cat([result, preds[1 : 1 + config.window]])

    def _capture(self) -> None:
        """Record the step and the prefill chunk as CUDA graphs; warm-up runs leave the cache as they found it."""
        saved = self._cached_length().clone()
        for replayable in (self.run_step, self.run_prefill_chunk):
            replayable.capture(lambda: self._set_cached_length(saved))
