"""Running one fused step: forward, verification and KV commit, returning the outcome to the host at once.

A runner holds one or more step shapes (each a `StepLayout`) over one KV cache; the decoding loop says which
shape each step uses. `EagerStep` grows a dynamic cache and works for every supported model and decoding mode.
`engine.StaticStep` runs the same steps with fixed shapes over a preallocated cache, so they can be replayed as
CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

from .config import LookaheadConfig
from .kv_cache import commit_candidate_kv
from .layout import StepLayout
from .model_adapter import ModelAdapter
from .verification import GreedyVerifier, Verifier


class StepOutcome(NamedTuple):
    """What one step decided, read from the step's single host copy."""

    accepted: int  # draft tokens of the winning candidate that were accepted
    winner: int  # index of the winning candidate
    committed: list[int]  # the tokens committed by this step: accepted + 1 of them
    new_level: list[int]  # the model's predictions for the window's last level (W tokens)
    # [at least accepted + 1, V] on the device: row i holds the logits that chose committed[i] (before logits
    # processors); what stopping criteria get as `scores`, as in HF generate.
    scores: torch.Tensor | None = None

    @classmethod
    def from_host(cls, values: list[int], config: LookaheadConfig, scores: torch.Tensor | None = None) -> "StepOutcome":
        """Unpack [accepted, winner, committed padded to K+1, new level] as verification and the step pack it."""
        accepted, winner, k = values[0], values[1], config.candidate_length
        return cls(accepted, winner, values[2 : 3 + accepted], values[3 + k : 3 + k + config.window], scores)


class StepRunner(Protocol):
    layouts: tuple[StepLayout, ...]  # the step shapes this runner can run, by index
    adapter: ModelAdapter

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> StepOutcome:
        """Cache the prompt [P]; the outcome commits the first new token."""

    def step(self, shape: int, step_ids: list[int], num_candidates: int, history: Sequence[int]) -> StepOutcome:
        """Run one step of shape `shape` on layout-ordered ids."""


def build_layouts(shapes: Sequence[LookaheadConfig], device) -> tuple[StepLayout, ...]:
    if not shapes:
        raise ValueError("a step runner needs at least one step shape")
    lengths = {shape.candidate_length for shape in shapes if shape.guesses > 0}
    if len(lengths) > 1:
        raise ValueError(f"the step shapes verify candidates of different lengths {sorted(lengths)}; they share one "
                         "candidate source, so their candidate_length must agree")
    return tuple(StepLayout.build(shape, device) for shape in shapes)


class EagerStep:
    """The fused steps on transformers' DynamicCache; verification decided by a `Verifier`."""

    def __init__(self, adapter: ModelAdapter, shapes: Sequence[LookaheadConfig], verifier: Verifier | None = None):
        self.adapter, self.layouts = adapter, build_layouts(shapes, adapter.device)
        self.verifier = verifier if verifier is not None else GreedyVerifier()
        self.cache = adapter.new_cache()
        self.last_position = (adapter.context_length or 2**62) - 1

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> StepOutcome:
        self.cache = self.adapter.new_cache()
        positions = torch.arange(prompt.numel(), device=prompt.device)
        logits = self.adapter.forward(prompt, positions, None, self.cache, logit_rows=1)
        # The prefill's token is verified with no candidates: argmax when greedy, a draw when sampling.
        none = torch.empty(0, 1, dtype=torch.long, device=prompt.device)
        first = self.verifier(logits[-1], none, logits.new_empty(0, 1, logits.shape[-1]), none[:, 0].bool(), history)
        return StepOutcome(0, 0, [int(first[2])], [], logits[-1:])

    def step(self, shape: int, step_ids: list[int], num_candidates: int, history: Sequence[int]) -> StepOutcome:
        layout, device = self.layouts[shape], self.adapter.device
        config = layout.config
        guesses, k = config.guesses, config.candidate_length
        t = len(history) - 1  # position of the current token, = cached tokens
        ids = torch.tensor(step_ids, device=device)
        positions = (layout.position_offsets + t).clamp_(max=self.last_position)
        key_positions = torch.cat([torch.arange(t, device=device), positions])
        allowed = torch.cat([layout.allowed.new_ones(layout.size, t), layout.allowed], dim=1)
        mask = self.adapter.attention_mask(allowed, positions, key_positions)

        logits = self.adapter.forward(ids, positions, mask, self.cache, layout.logit_rows)
        # The lookahead branch always refines by argmax; only verification depends on the decoding mode.
        new_level = logits[layout.new_level_logits].argmax(dim=-1)
        candidates = ids[layout.candidate_rows].view(guesses, k)
        candidate_logits = logits[layout.candidate_logits].view(guesses, k, logits.shape[-1])
        valid = torch.arange(guesses, device=device) < num_candidates
        result = self.verifier(logits[0], candidates, candidate_logits, valid, history)

        outcome = StepOutcome.from_host(torch.cat([result, new_level]).tolist(), config)  # the one host sync
        commit_candidate_kv(self.cache, layout.size, layout.candidate_token_rows(outcome.winner), outcome.accepted)
        scores = logits[:1]
        if outcome.accepted > 0:
            scores = torch.cat([scores, candidate_logits[outcome.winner, : outcome.accepted]])
        return outcome._replace(scores=scores)
