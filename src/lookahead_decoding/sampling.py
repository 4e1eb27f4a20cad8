"""Decoding under arbitrary HF logits processors, verified on the host; and the arguments of sampling.

Sampling without logits processors runs on the device, inside the step (`row_sampler.py`). A user's own
`LogitsProcessor` objects are Python that looks at the sequence, so with them every verified position is processed
here, one row at a time. Drafts are one-hot: the lookahead branch refines its window by argmax, so a candidate is a bare token
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
from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from .sampling_params import SEED_LIMIT, SamplingParams
from .verification import Verifier, pack


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
        min_p: float = 0.0,
    ) -> None:
        super().__init__(sampling_processors(logits_processor, temperature, top_k, top_p, min_p))
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


def sampling_processors(logits_processor, temperature: float, top_k: int | None, top_p: float,
                        min_p: float = 0.0) -> LogitsProcessorList:
    """The user's processors followed by the warpers, as HF `generate` orders them for sampling."""
    processors = LogitsProcessorList(logits_processor or [])
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    if min_p:
        processors.append(MinPLogitsWarper(min_p=float(min_p), min_tokens_to_keep=1))
    return processors


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def same_device(first, second) -> bool:
    """Whether two devices are one place: "cuda" is the current CUDA device, so it is "cuda:0" when that is."""
    first, second = torch.device(first), torch.device(second)
    if first.type != second.type:
        return False
    if first.type != "cuda":
        return first.index is None or second.index is None or first.index == second.index
    current = torch.cuda.current_device if torch.cuda.is_available() else (lambda: 0)
    return (current() if first.index is None else first.index) == (current() if second.index is None else second.index)


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
        if not same_device(generator.device, device):
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; create it there")


def warn_ignored_when_greedy(**given) -> None:
    """Warn (as HF `generate` does) about sampling arguments that greedy decoding does not use; `given` maps each
    argument's name to whether it was set."""
    ignored = [name for name, used in given.items() if used]
    if ignored:
        warnings.warn(f"do_sample=False decodes greedily; ignoring {', '.join(ignored)}", UserWarning, stacklevel=4)


def make_verifier(
    device,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    logits_processor=None,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
) -> Verifier:
    """The host verifier for these generation arguments (validated), for decoding under logits processors.

    do_sample=False is greedy: `ProcessedGreedyVerifier`, sampling arguments ignored with a warning, as HF
    `generate` does. With do_sample=True and no generator, one is seeded
    from torch's global RNG, so `torch.manual_seed` makes runs reproducible.
    """
    check_sampling_args(do_sample, temperature, top_k, top_p, logits_processor, generator, device)
    if not do_sample:
        warn_ignored_when_greedy(temperature=temperature != 1.0, top_k=bool(top_k), top_p=top_p != 1.0,
                                 min_p=bool(min_p), generator=generator is not None)
        return ProcessedGreedyVerifier(logits_processor)
    generator = generator if generator is not None else seeded_generator(device)
    return SamplingVerifier(generator, temperature, top_k, top_p, logits_processor, min_p)


def seeded_generator(device) -> torch.Generator:
    """A generator on `device` seeded from torch's global RNG, so that `torch.manual_seed` fixes its draws."""
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,))))


def row_seeds(count: int, seed, generator: torch.Generator | None) -> list[int]:
    """One seed per row: `seed` + row for an int, the given ones for a list, else drawn from `generator` (or
    torch's global RNG), so that seeding either reproduces the run."""
    if seed is None:
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, SEED_LIMIT - 1, (count,), generator=generator, device=device).tolist()
    if generator is not None:
        raise ValueError("give seed or generator, not both: the generator only supplies seeds")
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"seed has {len(seed)} values for {count} prompts; give one per prompt or one int")
        return list(seed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_LIMIT - count:
        raise ValueError(f"seed must be an integer in [0, 2**63 - prompts] or a list of one per prompt, got {seed!r}")
    return [seed + row for row in range(count)]


def row_sampling(count: int, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed=None,
                 generator: torch.Generator | None = None) -> list[SamplingParams] | None:
    """The `SamplingParams` of each of `count` rows for `ld.generate`'s arguments (checked by
    `check_sampling_args` first), or None for plain greedy decoding, which the greedy engine does alone."""
    if not do_sample:
        warn_ignored_when_greedy(temperature=temperature != 1.0, top_k=bool(top_k), top_p=top_p != 1.0,
                                 min_p=bool(min_p), generator=generator is not None, seed=seed is not None)
        params = SamplingParams(0.0, 0, 1.0, 0.0, repetition_penalty, presence_penalty, frequency_penalty)
        return None if params.is_plain_greedy else [params] * count
    return [SamplingParams(temperature, top_k or 0, top_p, min_p, repetition_penalty, presence_penalty,
                           frequency_penalty, row_seed) for row_seed in row_seeds(count, seed, generator)]
