"""The decoding loop: one fused forward per step runs the lookahead branch and verifies pooled candidates.

    prefill  ->  repeat: propose candidates | fused forward | verify | commit KV | advance window | emit tokens
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .config import LookaheadConfig
from .drafting import CandidateSource, NGramPoolSource
from .layout import StepLayout
from .model_adapter import ModelAdapter
from .ngram_pool import NGramPool
from .sampling import make_verifier
from .step import EagerStep, StepRunner
from .verification import Verifier
from .window import JacobiWindow


@dataclass
class GenerationStats:
    """steps: forward passes after the prefill; accepted_histogram: {tokens committed in a step: steps}."""

    steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    accepted_histogram: Counter = field(default_factory=Counter)

    @property
    def tokens_per_step(self) -> float:
        """New tokens per forward pass after the prefill (the compression ratio)."""
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_second": self.tokens_per_second,
            "seconds": self.seconds,
            "accepted_histogram": {str(k): v for k, v in sorted(self.accepted_histogram.items())},
        }


@dataclass
class LookaheadOutput:
    sequences: torch.LongTensor  # [1, prompt_len + new_tokens]
    stats: GenerationStats


class _Emitter:
    """Appends committed tokens one at a time and decides, token by token, whether generation stops."""

    def __init__(self, history: list[int], max_new_tokens: int, eos_ids: set[int], stopping_criteria, streamer, device):
        self.history = history
        self.remaining = max_new_tokens
        self.eos_ids = eos_ids
        self.stopping_criteria = stopping_criteria or None
        self.streamer = streamer
        self.device = device
        self.done = max_new_tokens == 0

    def emit(self, tokens: Iterable[int]) -> int:
        """Commit tokens until one of them stops generation; returns how many were committed."""
        count = 0
        for token in tokens:
            self.history.append(token)
            self.remaining -= 1
            count += 1
            if self.streamer is not None:
                self.streamer.put(torch.tensor([token]))
            if self.remaining == 0 or token in self.eos_ids or self._criteria_met():
                self.done = True
                break
        return count

    def _criteria_met(self) -> bool:
        if self.stopping_criteria is None:
            return False
        ids = torch.tensor([self.history], device=self.device)
        return bool(self.stopping_criteria(ids, None).any())


def _eos_set(model, eos_token_id) -> set[int]:
    """EOS ids from `eos_token_id` (an int, a sequence of ints or an integer tensor), else from the model's
    generation config. Anything else is an error: a string such as "2" would never match a token."""
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    given = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
    ids = given if isinstance(given, (list, tuple, set, frozenset)) else [given]
    # __index__: ints and numpy integers, but not floats, strings or nested lists (bool is excluded by hand).
    if not all(hasattr(i, "__index__") and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_token_id must be an int, a list of ints or an integer tensor, got {eos_token_id!r} "
                        f"({type(eos_token_id).__name__})")
    if any(i < 0 for i in ids):
        raise ValueError(f"eos_token_id must hold token ids >= 0, got {eos_token_id!r}")
    return {i.__index__() for i in ids}


def _check_inputs(adapter: ModelAdapter, input_ids, max_new_tokens, config) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer torch.Tensor of shape [1, prompt_len]")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, prompt_len], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"lookahead decoding supports batch size 1 only, got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: input_ids has no tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(config, LookaheadConfig):
        raise TypeError(f"config must be a LookaheadConfig, got {type(config).__name__}")
    total = input_ids.shape[1] + max_new_tokens
    if adapter.context_length is not None and total > adapter.context_length:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds the "
            f"model's context length of {adapter.context_length}"
        )
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids holds token ids outside the model's vocabulary [0, {vocab})")


def decode(
    model,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    config: LookaheadConfig,
    streamer=None,
    stopping_criteria=None,
    eos_token_id=None,
    source: CandidateSource | None = None,
    seed: int = 0,
    stream_prompt: bool = True,
    verifier: Verifier | None = None,
    runner: StepRunner | None = None,
) -> LookaheadOutput:
    """Lookahead decoding; greedy unless `verifier` says otherwise (see `sampling.make_verifier`).

    `stream_prompt=False` when the caller already sent the prompt (HF generate). `runner` runs the fused
    step (default: `EagerStep` with `verifier`); `engine.StaticStep` is the fixed-shape, graph-ready one.
    """
    adapter = ModelAdapter(model)
    _check_inputs(adapter, input_ids, max_new_tokens, config)
    if streamer is not None and stream_prompt:
        streamer.put(input_ids.cpu())
    device = adapter.device
    prompt = input_ids[0].tolist()
    history = list(prompt)
    stats = GenerationStats()
    emitter = _Emitter(history, max_new_tokens, _eos_set(model, eos_token_id), stopping_criteria, streamer, device)

    runner = runner if runner is not None else EagerStep(adapter, StepLayout.build(config, device), verifier)
    if runner.layout.config != config:
        raise ValueError(f"the step runner was built for {runner.layout.config}, not {config}")
    window = JacobiWindow(config.window, config.levels, random.Random(seed))
    pool = NGramPool(config.candidate_length, config.guesses)
    source = source if source is not None else NGramPoolSource(pool, from_text=config.pool_from_prompt)
    window.begin(prompt)
    source.begin(prompt)
    k = config.candidate_length

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        if not emitter.done:
            emitter.emit([runner.prefill(input_ids[0].to(device), history)])
        while not emitter.done:
            current = history[-1]
            proposals = source.propose(history, config.guesses)
            padding = [proposals[0] if proposals else (current,) * k] * (config.guesses - len(proposals))
            step_ids = runner.layout.input_ids(current, window.tokens(), proposals + padding)
            accepted, _, *rest = runner.step(step_ids, len(proposals), history)
            committed, new_level = rest[: k + 1], rest[k + 1 :]
            for key, continuation in window.advance(current, new_level):
                pool.add(key, continuation)
            num_new = emitter.emit(committed[: accepted + 1])
            source.observe(history, num_new)
            stats.steps += 1
            stats.accepted_histogram[num_new] += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(history) - len(prompt)
    if streamer is not None:
        streamer.end()
    return LookaheadOutput(torch.tensor([history], dtype=torch.long, device=input_ids.device), stats)


def generate(
    model,
    input_ids: torch.LongTensor,
    max_new_tokens: int = 128,
    config: LookaheadConfig | None = None,
    streamer=None,
    stopping_criteria=None,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    logits_processor=None,
    generator: torch.Generator | None = None,
    runner: StepRunner | None = None,
) -> LookaheadOutput:
    """Lookahead decoding with the output distribution of `model.generate`, in fewer forward passes.

    do_sample=False (the default) is greedy: the same tokens as `model.generate(do_sample=False)`, with
    `logits_processor` applied before each argmax. do_sample=True samples from the processed logits warped by
    temperature (> 0), top_k (None or 0: off) and top_p (1: off); every committed token has exactly the
    distribution `model.generate(do_sample=True)` gives it. Randomness comes from `generator` (a
    torch.Generator on the model's device), or from torch's global RNG when it is None.

    runner: a prebuilt step runner, e.g. `StaticStep` (static cache, CUDA graphs), reused across calls; it
    decodes greedily, so it cannot be combined with sampling or logits processors.
    """
    config = config if config is not None else LookaheadConfig()
    verifier = make_verifier(model.device, do_sample, temperature, top_k, top_p, logits_processor, generator)
    if runner is not None and (do_sample or logits_processor):
        raise ValueError("runner= decodes greedily: it cannot be combined with do_sample or logits_processor")
    return decode(
        model, input_ids, max_new_tokens, config, streamer, stopping_criteria, eos_token_id, verifier=verifier,
        runner=runner,
    )
