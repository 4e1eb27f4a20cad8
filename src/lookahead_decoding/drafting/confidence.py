"""Source confidences learned online: how often verification accepted the drafts of each kind of evidence.

A source's probability for a draft token is its own estimate (a count share, a match length, the model's
recycled softmax) shaped by a formula set by hand. Verification tells, for every node whose parent was accepted,
whether the node was accepted too: an unbiased trial of the claim "this token is right given that the ones
before it are". `Confidences` keeps running counts of those trials per key, and the key says which source and
what evidence the draft had: the source's `Draft.evidence`, the node's depth, the source's own probability
(binned), and the row's context: whether it samples, and whether its last verification accepted anything
(acceptance comes in runs). A key's calibrated
probability is the accepted share with the source's own estimate as a prior of `PRIOR_WEIGHT` trials, so a key
with little data keeps the hand-set number and one with much data follows what verification measured.

One `Confidences` serves every row of a scheduler, and a `DraftMemory` carries one across calls, so a new
sequence starts from what earlier ones of the same model measured.
"""

from __future__ import annotations

from collections.abc import Hashable

PRIOR_WEIGHT = 8.0  # trials the source's own estimate counts as, before any outcome
BINS = 10  # the source's own probability, binned in tenths
MAX_DEPTH = 8  # deeper nodes share the key of this depth
# Counts are halved once a key has this many trials, so old outcomes fade and the numbers follow the text.
MAX_TRIALS = 4096

Key = tuple  # (the row's context, the draft's evidence, depth, bin of the source's probability)


def key(context: Hashable, evidence: Hashable, depth: int, probability: float) -> Key:
    """The key of a draft token; `context`: what the row says about itself (whether it samples, whether its last
    verification accepted anything)."""
    return context, evidence, min(depth, MAX_DEPTH), min(int(probability * BINS), BINS - 1)


def evidence_of(key_: Key) -> Hashable:
    return key_[1]


class Confidences:
    """Accepted and tried counts per key, and the calibrated probabilities they give."""

    def __init__(self) -> None:
        self.counts: dict[Key, list[float]] = {}  # key -> [accepted, tried]

    def probability(self, key_: Key, prior: float) -> float:
        """The calibrated chance that a token of `key_` is right, its source having said `prior`."""
        counts = self.counts.get(key_)
        if counts is None:
            return prior
        return (counts[0] + PRIOR_WEIGHT * prior) / (counts[1] + PRIOR_WEIGHT)

    def record(self, key_: Key, accepted: bool) -> None:
        counts = self.counts.get(key_)
        if counts is None:
            counts = self.counts[key_] = [0.0, 0.0]
        counts[0] += accepted
        counts[1] += 1
        if counts[1] >= MAX_TRIALS:
            counts[0] /= 2
            counts[1] /= 2
