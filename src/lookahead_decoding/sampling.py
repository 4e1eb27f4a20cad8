"""Lossless sampling for lookahead decoding, and greedy decoding under logits processors.

Drafts are one-hot: the lookahead branch refines its window by argmax, so a candidate is a bare token
sequence. For one-hot drafts, multi-candidate speculative sampling is exact: at each verified position the committed
token is distributed exactly as the warped target distribution P (docs/algorithm.md, "The multi-candidate sampling
rule", has the rule and why).

Drafts form a token tree (`drafting/tree.py`): the children of a node are the drafts for the position after it,
distinct tokens tried best first. Every verified position is processed with its true prefix (the committed
history plus the tokens accepted so far in this step), so logits processors that look at the sequence, such as
a repetition penalty, see exactly what `model.generate` would show them; each committed token's distribution is
computed once, in order, as in `model.generate`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .verification import GreedyVerifier, Verifier, pack


class PathVerifier:
    """Verifies the tree position by position, walking down from the current token.

    At each node of the walk the verifier gets the processed scores for the path so far and the tokens of the
    node's children (distinct, best first); `choose` returns the committed token and whether it is one of those
    drafts. On acceptance the walk moves to that child, whose logits give the next position's scores. Where the
    walk reaches a leaf, the bonus token is chosen from the leaf's logits with no drafts left.
    """

    def __init__(self, logits_processor: LogitsProcessorList | None = None) -> None:
        self.processors = LogitsProcessorList(logits_processor or [])

    def choose(self, scores: torch.Tensor, drafts: list[int]) -> tuple[int, bool]:
        """(committed token, whether it is one of `drafts`) given processed scores [V]."""
        raise NotImplementedError

    def scores(self, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Processed float32 scores [V] for the position after `prefix` [1, L]."""
        scores = logits.to(torch.float32, copy=True)[None]
        return self.processors(prefix, scores)[0] if self.processors else scores[0]

    def __call__(self, next_logits, tree, tree_logits, max_depth, history) -> torch.Tensor:
        tokens, parents, valid = tree.tokens.tolist(), tree.parents.tolist(), tree.valid.tolist()
        root = len(tokens)
        children: dict[int, list[int]] = {}
        for node, (parent, ok) in enumerate(zip(parents, valid)):
            if ok:
                children.setdefault(parent, []).append(node)
        prefix = torch.tensor([list(history)], dtype=torch.long, device=next_logits.device)
        logits, node, committed, path = next_logits, root, [], []
        while True:
            options = children.get(node, [])
            token, accepted = self.choose(self.scores(prefix, logits), [tokens[child] for child in options])
            committed.append(token)
            if not accepted:
                break
            node = next(child for child in options if tokens[child] == token)
            path.append(node)
            prefix = torch.cat([prefix, prefix.new_tensor([[token]])], dim=1)
            logits = tree_logits[node]
        device = next_logits.device
        return pack(torch.tensor(len(path), device=device),
                    torch.tensor(committed + [0] * (max_depth + 1 - len(committed)), device=device),
                    torch.tensor(path + [0] * (max_depth - len(path)), device=device))


class ProcessedGreedyVerifier(PathVerifier):
    """Exact greedy verification when logits processors apply: processors, then argmax, at every position."""

    def choose(self, scores, drafts):
        token = int(scores.argmax())
        return token, token in drafts


class SamplingVerifier(PathVerifier):
    """Multi-candidate speculative sampling with one-hot drafts.

    P is the warped distribution: logits processors, then temperature, top-k and top-p, in the order HF
    `generate` applies them. The distinct draft tokens are tried in candidate order: token x is accepted with
    probability P(x) / (mass of P not yet rejected), i.e. P(x) after the rejected tokens were zeroed and P
    renormalised. If all are rejected, the token is drawn from the residual. All randomness comes from
    `generator`, so a seeded generator reproduces a run.
    """

    def __init__(
        self,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        logits_processor: LogitsProcessorList | None = None,
    ) -> None:
        super().__init__(sampling_processors(logits_processor, temperature, top_k, top_p))
        self.generator = generator

    def acceptance(self, probs: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
        """Acceptance probability of each draft given its probability and the unrejected mass before it."""
        return (probs / remaining.clamp_min(torch.finfo(probs.dtype).tiny)).clamp_(max=1.0)

    def choose(self, scores, drafts):
        probs = torch.softmax(scores, dim=-1)
        if drafts:
            index = torch.tensor(drafts, device=probs.device)
            draft_probs = probs[index]
            remaining = 1.0 - (draft_probs.cumsum(0) - draft_probs)
            coins = torch.rand(len(drafts), generator=self.generator, device=probs.device)
            hits = (coins < self.acceptance(draft_probs, remaining)).tolist()
            if True in hits:
                return drafts[hits.index(True)], True
            residual = probs.index_fill(0, index, 0.0)
            # All mass on rejected drafts can only happen through rounding; then P itself is the residual.
            probs = residual if bool(residual.sum() > 0) else probs
        return int(torch.multinomial(probs, 1, generator=self.generator)), False


def sampling_processors(logits_processor, temperature: float, top_k: int | None, top_p: float) -> LogitsProcessorList:
    """The user's processors followed by the warpers, as HF `generate` orders them for sampling."""
    processors = LogitsProcessorList(logits_processor or [])
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return processors


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_args(do_sample, temperature, top_k, top_p, logits_processor, generator, device) -> None:
    """ValueError naming the argument for anything `make_verifier` cannot use.

    The sampling arguments (temperature, top_k, top_p, generator) are only checked when do_sample is True.
    """
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if logits_processor is not None:
        if not isinstance(logits_processor, Sequence) or not all(callable(p) for p in logits_processor):
            raise ValueError("logits_processor must be a LogitsProcessorList or a list of logits processors")
    if not do_sample:
        return
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r}; for greedy decoding use do_sample=False"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 or None disables it), got {top_k!r}")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 disables it), got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = torch.device(device)
        if generator.device.type != device.type or (device.index is not None and generator.device.index != device.index):
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; create it there")


def make_verifier(
    device,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    logits_processor=None,
    generator: torch.Generator | None = None,
) -> Verifier:
    """The verifier for these generation arguments (validated).

    do_sample=False is greedy: the fast `GreedyVerifier`, or `ProcessedGreedyVerifier` when logits processors
    are given. Sampling arguments are then ignored, with a warning, as HF `generate` does. With
    do_sample=True and no generator, one is seeded from torch's global RNG, so `torch.manual_seed` makes
    runs reproducible.
    """
    check_sampling_args(do_sample, temperature, top_k, top_p, logits_processor, generator, device)
    if not do_sample:
        ignored = [
            name
            for name, unused in (("temperature", temperature != 1.0), ("top_k", bool(top_k)),
                                 ("top_p", top_p != 1.0), ("generator", generator is not None))
            if unused
        ]
        if ignored:
            warnings.warn(f"do_sample=False decodes greedily; ignoring {', '.join(ignored)}", UserWarning, stacklevel=3)
        return ProcessedGreedyVerifier(logits_processor) if logits_processor else GreedyVerifier()
    generator = generator if generator is not None else seeded_generator(device)
    return SamplingVerifier(generator, temperature, top_k, top_p, logits_processor)


def seeded_generator(device) -> torch.Generator:
    """A generator on `device` seeded from torch's global RNG, so that `torch.manual_seed` fixes its draws."""
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,))))
