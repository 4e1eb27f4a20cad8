"""Running one fused step: forward, verification and KV commit, returning the outcome to the host at once.

A runner holds one or more step shapes (each a `StepLayout`) over one KV cache; the decoding loop says which
shape each step uses and hands it the step's token tree. `EagerStep` grows a dynamic cache and works for every
supported model and decoding mode. `engine.StaticStep` runs the same steps with fixed shapes over a
preallocated cache, so they can be replayed as CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

import numpy
import torch

from .config import LookaheadConfig
from .drafting.base import ModelPredictions
from .drafting.tree import ROOT, TokenTree
from .kv_cache import commit_path_kv
from .layout import StepLayout, TreeTensors, tree_tensors
from .model_adapter import ModelAdapter
from .row_sampler import RowSampler, choose_tokens
from .sampling_params import SamplingParams
from .verification import Verifier, verified_first_token, verify_greedy


class StepOutcome(NamedTuple):
    """What one step decided, read from the step's single host copy."""

    accepted: int  # draft tokens accepted: the depth of the accepted path
    path: list[int]  # the tree nodes accepted, from depth 1 down
    committed: list[int]  # the tokens committed by this step: accepted + 1 of them
    new_level: list[int]  # the model's predictions for the window's last level (W tokens)
    # [at least accepted + 1, V] on the device: row i holds the logits that chose committed[i] (before logits
    # processors); what stopping criteria get as `scores`, as in HF generate.
    scores: torch.Tensor | None = None
    predictions: ModelPredictions | None = None  # the model's top-k at the step's computed rows, when asked

    @classmethod
    def from_host(cls, values: list[int], config: LookaheadConfig, scores: torch.Tensor | None = None,
                  predictions: ModelPredictions | None = None) -> "StepOutcome":
        """Unpack [accepted, committed padded to K+1, path padded to K, new level] (`verification.pack`, then the
        new level)."""
        accepted, depth = values[0], config.candidate_length
        committed = values[1 : 2 + accepted]
        path = values[2 + depth : 2 + depth + accepted]
        new_level = values[2 + 2 * depth : 2 + 2 * depth + config.window]
        return cls(accepted, path, committed, new_level, scores, predictions)


class RowOutcomes(Sequence):
    """A step's outcomes for all rows, read from its one host copy: `packed` holds each row's as
    `StepOutcome.from_host` reads it; row by row (indexing, iterating), a StepOutcome, or None where the row did not
    decode. `scores`: [rows, K+1, V] on the device, the logits along each row's accepted path (None: replaced)."""

    def __init__(self, packed: numpy.ndarray, decoding: Sequence[bool], config: LookaheadConfig,
                 scores: torch.Tensor | None = None, predictions: Sequence[ModelPredictions] | None = None) -> None:
        self.packed, self.decoding, self.config = packed, decoding, config
        self.scores, self.predictions = scores, predictions

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, row: int) -> StepOutcome | None:
        if not self.decoding[row]:
            return None
        return StepOutcome.from_host(self.packed[row].tolist(), self.config,
                                     None if self.scores is None else self.scores[row],
                                     None if self.predictions is None else self.predictions[row])


class PromptPart(NamedTuple):
    """Ids of a prompt that a row carries in one step: as many as the step has rows at most."""

    ids: Sequence[int]
    ends_prompt: bool  # whether they are its last: the step then commits the sequence's first token


class TokenRows(NamedTuple):
    """A step of every row at once, of a shape that drafts nothing on the host (plain, or drafting on the device):
    all it needs of a row is its current token, so it is laid out with array operations, not Python per row."""

    current: numpy.ndarray  # [rows] each row's current token
    decoding: numpy.ndarray  # [rows] bool: whether the row decodes
    drafting: numpy.ndarray  # [rows] bool: whether it verifies the shape's device-drafted tree (else one token)
    lengths: numpy.ndarray  # [rows] its tokens so far (prompt and committed)
    # By row: the next ids of a new sequence's prompt that the row carries in this step instead of decoding
    # (`engine.StaticStep.carry_prompts`).
    prompts: Mapping[int, PromptPart] | None = None


class PlannedStep(NamedTuple):
    """One sequence's part of a step, as the decoding loop hands it to a runner."""

    shape: int  # index of the step shape in the plan
    ids: list[int]  # the step's input ids in layout order
    tree: TokenTree  # the tree whose tokens `ids` carries after the window


# Whether the device is still computing the step just launched (always False where steps run synchronously).
DeviceBusy = Callable[[], bool]


def never_busy() -> bool:
    """The `DeviceBusy` of a runner whose steps have finished when they return (eager, or on the CPU)."""
    return False


class StepRunner(Protocol):
    layouts: tuple[StepLayout, ...]  # the step shapes this runner can run, by index
    adapter: ModelAdapter
    predictions: int  # the model's top next tokens each step reports at every computed row (0: none)
    batch_size: int  # sequences it decodes side by side, one row each

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> StepOutcome:
        """Cache one sequence's prompt [P] (in row 0); the outcome commits the first new token."""

    def step(self, shape: int, step_ids: list[int], tree: TokenTree, history: Sequence[int]) -> StepOutcome:
        """Run one step of shape `shape` for the sequence in row 0, on layout-ordered ids; `tree` holds the tree
        nodes (at most the shape's budget), whose tokens step_ids carries after the window."""

    def prefill_rows(self, prompts: dict[int, Sequence[int]],
                     sampling: dict[int, SamplingParams | None] | None = None) -> dict[int, StepOutcome]:
        """Start a sequence in each given row from its prompt (tokens), choosing its tokens with its `sampling`
        parameters (missing or None: greedy); outcomes by row."""

    def step_rows(self, shape: int, steps: Sequence[PlannedStep | None], histories: Sequence[Sequence[int] | None],
                  overlap: Callable[[DeviceBusy], None] | None = None) -> list[StepOutcome | None]:
        """One step of `shape` for every row (None: the row is not decoding); outcomes by row. `overlap` is host
        work that does not depend on the step: the runner runs it while the device computes, where it can, and
        hands it a `DeviceBusy` so that work it may put off stops once the host would no longer wait anyway."""


def build_layouts(shapes: Sequence[LookaheadConfig], device) -> tuple[StepLayout, ...]:
    if not shapes:
        raise ValueError("a step runner needs at least one step shape")
    for shape in shapes:
        if not isinstance(shape, LookaheadConfig):
            raise TypeError(f"a step runner's shapes are LookaheadConfigs, got {shape!r}")
    lengths = {shape.candidate_length for shape in shapes if shape.verifies}
    if len(lengths) > 1:
        raise ValueError(f"the step shapes verify drafts of different lengths {sorted(lengths)}; they share one "
                         "token tree, so their candidate_length must agree")
    return tuple(StepLayout.build(shape, device) for shape in shapes)


def tree_parents(tree: TokenTree, budget: int) -> list[int]:
    """The parents as the device tensors take them, padded to `budget`: the root (and padding) as `budget`."""
    return [budget if parent == ROOT else parent for parent in tree.parents] + [budget] * (budget - len(tree))


def top_predictions(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens [R, k] and their probabilities [R, k] (float32) of every logit row."""
    top = logits.topk(k, dim=-1)
    probabilities = (top.values.float() - logits.float().logsumexp(dim=-1, keepdim=True)).exp()
    return top.indices, probabilities


def host_predictions(row_tokens: torch.Tensor, top_tokens: torch.Tensor, top_probabilities: torch.Tensor
                     ) -> list[ModelPredictions]:
    """`top_predictions` of a batch's rows holding `row_tokens` [batch, R], copied to the host: one
    ModelPredictions per batch row."""
    return [ModelPredictions(*row) for row in zip(row_tokens.tolist(), top_tokens.tolist(), top_probabilities.tolist())]


class EagerStep:
    """The fused steps on transformers' DynamicCache, for one sequence. Drafts are verified against the argmax,
    against the sequence's draws (`sampling=True`: its `SamplingParams` come with its prompt), or by a `Verifier`
    (logits processors)."""

    def __init__(self, adapter: ModelAdapter, shapes: Sequence[LookaheadConfig], verifier: Verifier | None = None,
                 predictions: int = 0, sampling: bool = False):
        """predictions: how many of the model's top next tokens to report at every computed row (0: none)."""
        if verifier is not None and sampling:
            raise ValueError("a step runner samples either with its rows' SamplingParams or with a verifier, not both")
        if any(shape.device_drafts for shape in shapes):
            raise ValueError("steps that draft on the device run on the static engine (engine.StaticStep), not on a "
                             "dynamic cache")
        self.adapter, self.layouts = adapter, build_layouts(shapes, adapter.device)
        self.verifier, self.predictions = verifier, predictions
        self.sampler = RowSampler(1, adapter.vocab, adapter.device) if sampling else None
        self.cache = adapter.new_cache()
        self.last_position = (adapter.context_length or 2**62) - 1

    batch_size = 1  # a dynamic cache holds one sequence

    def prefill_rows(self, prompts: dict[int, Sequence[int]],
                     sampling: dict[int, SamplingParams | None] | None = None) -> dict[int, StepOutcome]:
        ((row, prompt),) = prompts.items()
        params = (sampling or {}).get(row)
        if self.sampler is not None:
            self.sampler.start_rows({0: params})
        elif params is not None and not params.is_plain_greedy:
            raise ValueError("this step runner decodes greedily; build it with sampling=True to sample or apply "
                             "penalties")
        return {row: self.prefill(torch.tensor(prompt, device=self.adapter.device), prompt)}

    def step_rows(self, shape: int, steps: Sequence[PlannedStep | None], histories: Sequence[Sequence[int] | None],
                  overlap: Callable[[DeviceBusy], None] | None = None) -> list[StepOutcome | None]:
        (step,), (history,) = steps, histories
        if overlap is not None:
            overlap(never_busy)
        return [None if step is None else self.step(shape, step.ids, step.tree, history)]

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> StepOutcome:
        self.cache = self.adapter.new_cache()
        positions = torch.arange(prompt.numel(), device=prompt.device)
        logits = self.adapter.forward(prompt, positions, None, self.cache, logit_rows=1)
        if self.verifier is not None:
            first = verified_first_token(self.verifier, logits[-1], history)
        elif self.sampler is not None:
            self.sampler.observe_prompt(prompt[None], torch.ones_like(prompt[None], dtype=torch.bool))
            chosen = self.sampler.choose(logits[-1:][None], positions.new_full((1, 1), prompt.numel()))
            self.sampler.observe_output(chosen, torch.ones_like(chosen, dtype=torch.bool))
            first = int(chosen)
        else:
            first = int(logits[-1].argmax())
        return StepOutcome(0, [], [first], [], logits[-1:])

    def step(self, shape: int, step_ids: list[int], tree: TokenTree, history: Sequence[int]) -> StepOutcome:
        layout, device = self.layouts[shape], self.adapter.device
        config = layout.config
        t = len(history) - 1  # position of the current token, = cached tokens
        ids = torch.tensor(step_ids, device=device)
        parents = torch.tensor(tree_parents(tree, config.tree_nodes), dtype=torch.long, device=device)
        nodes = tree_tensors(ids[layout.tree_rows], parents, torch.tensor(len(tree), device=device),
                             config.candidate_length)
        positions = (layout.positions(nodes) + t).clamp_(max=self.last_position)
        key_positions = torch.cat([torch.arange(t, device=device), positions])
        step_allowed = layout.allowed(nodes)
        allowed = torch.cat([step_allowed.new_ones(layout.size, t), step_allowed], dim=1)
        mask = self.adapter.attention_mask(allowed, positions, key_positions)

        logits = self.adapter.forward(ids, positions, mask, self.cache, layout.logit_rows)
        # The lookahead branch always refines by argmax; only verification depends on the decoding mode.
        new_level = logits[layout.new_level_logits].argmax(dim=-1)
        tree_logits = logits[layout.tree_logits]
        depth = config.candidate_length
        if self.verifier is not None:
            result = self.verifier(logits[0], nodes, tree_logits, depth, history)
        else:
            verified = layout.current_and_tree(logits)[None]
            batched = TreeTensors(*(part[None] for part in nodes))
            (choices,) = choose_tokens(self.sampler, verified, batched, torch.tensor([t], device=device), config)
            result = verify_greedy(choices[0], choices[1:], nodes, depth)
            if self.sampler is not None:  # count the committed tokens for the penalties
                decoding = result.new_ones(1, dtype=torch.bool)
                self.sampler.observe_step(result[None, 1 : 2 + depth], result[:1], decoding)
        host = torch.cat([result, new_level]).tolist()  # the one host sync
        predictions = None
        if self.predictions and config.verifies:  # as the static engine does (engine.py)
            top = top_predictions(logits, self.predictions)
            (predictions,) = host_predictions(ids[layout.logit_rows][None], *(part[None] for part in top))
        outcome = StepOutcome.from_host(host, config, predictions=predictions)
        path = torch.tensor(outcome.path, dtype=torch.long, device=device)
        commit_path_kv(self.cache, layout.size, layout.lookahead_size + path)
        scores = torch.cat([logits[:1], tree_logits[path]])
        return outcome._replace(scores=scores)
