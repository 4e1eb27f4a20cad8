"""Running one fused step: forward, verification and KV commit, returning the outcome to the host at once.

`EagerStep` grows a dynamic cache and works for every supported model and decoding mode. `engine.StaticStep`
runs the same step with fixed shapes over a preallocated cache, so it can be replayed as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .kv_cache import commit_candidate_kv
from .layout import StepLayout
from .model_adapter import ModelAdapter
from .verification import GreedyVerifier, Verifier


class StepRunner(Protocol):
    layout: StepLayout

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> int:
        """Cache the prompt [P]; return the first new token."""

    def step(self, step_ids: list[int], num_candidates: int, history: Sequence[int]) -> list[int]:
        """Run one step on layout-ordered ids; return [m, winner, committed (K+1), new last level (W)]."""


class EagerStep:
    """The fused step on transformers' DynamicCache; verification decided by a `Verifier`."""

    def __init__(self, adapter: ModelAdapter, layout: StepLayout, verifier: Verifier | None = None) -> None:
        self.adapter, self.layout = adapter, layout
        self.verifier = verifier if verifier is not None else GreedyVerifier()
        self.cache = adapter.new_cache()
        config = layout.config
        self.no_candidates = torch.empty(0, config.candidate_length, dtype=torch.long, device=adapter.device)
        self.last_position = (adapter.context_length or 2**62) - 1

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> int:
        positions = torch.arange(prompt.numel(), device=prompt.device)
        logits = self.adapter.forward(prompt, positions, None, self.cache, logit_rows=1)
        # The prefill's token is verified with no candidates: argmax when greedy, a draw when sampling.
        k = self.no_candidates.shape[1]
        first = self.verifier(logits[-1], self.no_candidates, logits.new_empty(0, k, logits.shape[-1]),
                              self.no_candidates[:, 0].bool(), history)
        return int(first[2])

    def step(self, step_ids: list[int], num_candidates: int, history: Sequence[int]) -> list[int]:
        layout, config, device = self.layout, self.layout.config, self.adapter.device
        guesses, k = config.guesses, config.candidate_length
        t = len(history) - 1  # position of the current token, = cached tokens
        ids = torch.tensor(step_ids, device=device)
        positions = (layout.position_offsets + t).clamp_(max=self.last_position)
        key_positions = torch.cat([torch.arange(t, device=device), positions])
        allowed = torch.cat([layout.allowed.new_ones(layout.size, t), layout.allowed], dim=1)
        mask = self.adapter.attention_mask(allowed, positions, key_positions)

        logits = self.adapter.forward(ids, positions, mask, self.cache, layout.logit_rows)
        # The lookahead branch always refines by argmax; only verification depends on the decoding mode.
        new_level = logits[1 : 1 + config.window].argmax(dim=-1)
        candidates = ids[layout.lookahead_size :].view(guesses, k)
        candidate_logits = logits[1 + config.window :].view(guesses, k, logits.shape[-1])
        valid = torch.arange(guesses, device=device) < num_candidates
        result = self.verifier(logits[0], candidates, candidate_logits, valid, history)

        outcome = torch.cat([result, new_level]).tolist()  # the step's one host sync
        accepted, winner = outcome[0], outcome[1]
        winner_rows = torch.arange(k, device=device) + layout.lookahead_size + winner * k
        commit_candidate_kv(self.cache, layout.size, winner_rows, accepted)
        return outcome
