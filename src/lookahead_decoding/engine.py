"""The fast engine: the fused greedy step with fixed shapes over a preallocated static KV cache.

Everything a step does — building the mask, the forward, verification and moving the winner's KV into place —
is a device op on fixed-shape buffers, with the cache length kept as a device tensor. On CUDA the step is
therefore captured once as a CUDA graph and replayed: one host-to-device copy of the step's ids, one replay,
one device-to-host copy of the outcome. Elsewhere the same step runs eagerly, with identical results.

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


class StaticStep:
    """A `StepRunner` for greedy decoding of sequences up to `max_length` tokens (prompt + new tokens)."""

    def __init__(
        self, model, config: LookaheadConfig, max_length: int, cuda_graph: bool | None = None, compile: bool = False
    ) -> None:
        """cuda_graph: capture the step as a CUDA graph (default: on CUDA devices). compile: fuse the step's
        kernels with torch.compile first (slow to start; worth it for long runs)."""
        adapter = ModelAdapter(model)
        if adapter.sliding_window is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses sliding-window attention, which the static engine does not support; "
                "use lookahead_decoding.generate (dynamic cache) instead"
            )
        if adapter.context_length is not None and max_length > adapter.context_length:
            raise ValueError(f"max_length {max_length} exceeds the model's context length of {adapter.context_length}")
        device = adapter.device
        self.adapter, self.layout = adapter, StepLayout.build(config, device)
        self.max_length = max_length
        size = self.layout.size
        # The step's rows are appended after the last committed token, so the cache needs `size` spare slots.
        cache_length = max_length + size
        self.cache = StaticCache(config=model.config, max_cache_len=cache_length)
        self.key_index = torch.arange(cache_length, device=device)
        self.inputs = torch.zeros(size + 1, dtype=torch.long, device=device)  # step ids, then #candidates
        self.host_inputs = torch.zeros(size + 1, dtype=torch.long, pin_memory=device.type == "cuda")
        self.last_position = (adapter.context_length or 2**62) - 1
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outcome: torch.Tensor | None = None
        self.run_step = torch.compile(self._device_step, dynamic=False) if compile else self._device_step

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> int:
        if prompt.numel() >= self.max_length:
            raise ValueError(f"the prompt ({prompt.numel()} tokens) does not fit this engine's max_length {self.max_length}")
        self.cache.reset()
        positions = torch.arange(prompt.numel(), device=prompt.device)
        logits = self.adapter.forward(prompt, positions, None, self.cache, logit_rows=1)
        if self.use_graph and self.graph is None:
            self._capture()
        return int(logits[-1].argmax())

    def step(self, step_ids: list[int], num_candidates: int, history: Sequence[int]) -> list[int]:
        if len(history) > self.max_length:  # the static cache has no room for the step's rows
            raise ValueError(f"generation ran past this engine's max_length {self.max_length}")
        self.host_inputs[:-1] = torch.tensor(step_ids)
        self.host_inputs[-1] = num_candidates
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return self.outcome.tolist()
        return self.run_step().tolist()

    def _cached_length(self) -> torch.Tensor:
        return self.cache.layers[0].cumulative_length

    def _device_step(self) -> torch.Tensor:
        layout, config = self.layout, self.layout.config
        size, guesses, k = layout.size, config.guesses, config.candidate_length
        step_ids, num_candidates = self.inputs[:size], self.inputs[size]
        start = self._cached_length().clone()  # tokens cached before this step; the current token sits there
        positions = (layout.position_offsets + start).clamp(max=self.last_position)
        relative = self.key_index - start
        in_step = (relative >= 0) & (relative < size)
        allowed = (relative < 0) | (in_step & layout.allowed[:, relative.clamp(0, size - 1)])
        mask = self.adapter.attention_mask(allowed, positions, None)

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
        for layer in self.cache.layers:
            if guesses > 0:
                layer.keys.index_copy_(2, target, layer.keys.index_select(2, source))
                layer.values.index_copy_(2, target, layer.values.index_select(2, source))
            layer.cumulative_length.copy_(start + 1 + accepted)
        return torch.cat([result, preds[1 : 1 + config.window]])

    def _capture(self) -> None:
        """Record the step as a CUDA graph; warm-up runs leave the cache as they found it."""
        saved = self._cached_length().clone()

        def restore():
            for layer in self.cache.layers:
                layer.cumulative_length.copy_(saved)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.run_step()
                restore()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outcome = self.run_step()
        restore()
