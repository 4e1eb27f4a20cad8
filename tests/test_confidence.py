"""Confidences learned online: a source's claims calibrated against what verification accepted, used by the tree
and the shape chooser; and the window's later value through the pool."""

import random

import pytest
import torch
from conftest import VOCAB, greedy_reference

from lookahead_decoding.config import LookaheadConfig
from lookahead_decoding.decoding import open_scheduler
from lookahead_decoding.drafting import CandidateSource, CombinedSource, Draft, NGramPool, build_tree
from lookahead_decoding.drafting.confidence import PRIOR_WEIGHT, Confidences, evidence_of, key
from lookahead_decoding.drafting.pool import FROM_TEXT, FROM_WINDOW, NGramPoolSource
from lookahead_decoding.drafting.tree import ROOT
from lookahead_decoding.scheduler import Request
from lookahead_decoding.shape_choice import AcceptancePrior, ShapeChooser


class CoinSource(CandidateSource):
    """Drafts the true greedy continuation, each token right with probability `right` given that the ones before
    it are (else a wrong token), while claiming `claimed` for every token."""

    def __init__(self, references: dict, right: float, claimed: float, seed: int, evidence="coin",
                 wrong_shift: int = 1) -> None:
        self.references, self.right, self.claimed = references, right, claimed
        self.rng, self.evidence, self.wrong_shift = random.Random(seed), evidence, wrong_shift

    def propose(self, history, max_length, budget):
        reference = next(r for prompt, r in self.references.items() if tuple(history[:len(prompt)]) == prompt)
        tokens = []
        for position in range(len(history), min(len(history) + max_length, len(reference))):
            right = self.rng.random() < self.right
            tokens.append(reference[position] if right else (reference[position] + self.wrong_shift) % VOCAB)
        return [Draft(tuple(tokens), (self.claimed,) * len(tokens), self.evidence)] if tokens else []


def references(model, prompts, new_tokens):
    return {tuple(p): greedy_reference(model, torch.tensor([p]), new_tokens)[0].tolist() for p in prompts}


def decode_in_turn(model, config, prompts, new_tokens, make_source):
    """Each prompt decoded after the other by one scheduler, whose rows share its confidences, with the source
    `make_source(index)`: the scheduler, and each request's tokens per step. Output is checked against greedy."""
    truth = references(model, prompts, new_tokens)
    scheduler = open_scheduler(model, 1, 256, config)
    tokens_per_step = []
    for index, prompt in enumerate(prompts):
        scheduler.submit(Request(prompt, new_tokens, source=make_source(truth, index)))
        (finished,) = scheduler.run()
        assert finished.tokens == truth[tuple(prompt)]
        tokens_per_step.append(finished.stats.tokens_per_step)
    return scheduler, tokens_per_step


@pytest.mark.parametrize("right", [0.3, 0.8])
def test_learned_confidence_converges_to_how_often_the_drafts_are_right(llama, right):
    prompts = [[(7 * i + j) % VOCAB for j in range(6)] for i in range(16)]
    config = LookaheadConfig(window=2, ngram=3, guesses=2, candidate_length=4, tree_nodes=4)
    scheduler, _ = decode_in_turn(llama, config, prompts, 200,
                                  lambda truth, index: CoinSource(truth, right, claimed=0.5, seed=index))
    confidences = scheduler.confidences
    counts = {k: c for k, c in confidences.counts.items() if evidence_of(k) == "coin"}
    well_measured = {k: c for k, c in counts.items() if c[1] >= 300}
    assert {k[2] for k in well_measured} >= {1, 2}, counts  # depths 1 and 2 at least, in some context
    for k, (accepted, tried) in well_measured.items():
        learned = confidences.probability(k, 0.5)
        assert abs(learned - right) <= 0.05, (k, accepted, tried, learned)


def test_a_key_without_outcomes_keeps_the_sources_number_and_the_prior_weighs_as_trials():
    confidences = Confidences()
    k = key((False, True), "coin", 1, 0.55)
    assert confidences.probability(k, 0.55) == 0.55
    for accepted in (True, False, True, True):
        confidences.record(k, accepted)
    assert confidences.probability(k, 0.55) == pytest.approx((3 + PRIOR_WEIGHT * 0.55) / (4 + PRIOR_WEIGHT))
    assert key(None, "x", 30, 1.0) == (None, "x", 8, 9)  # deep nodes and certainty share the last depth and bin


def test_the_tree_ranks_by_learned_confidence(llama):
    """Two sources disagree on every token: one claims 0.9 and is right 20% of the time, the other claims 0.3 and
    is right 90% of the time. With one node to verify, the tree would always verify the boastful one; once the
    confidences have learned, it verifies the modest one, and steps commit more."""
    prompts = [[(5 * i + j) % VOCAB for j in range(6)] for i in range(6)]
    config = LookaheadConfig(window=2, ngram=3, guesses=1, candidate_length=1, tree_nodes=1)

    def boastful_and_modest(learn):
        def make(truth, index):  # their wrong guesses differ, so their tokens never coincide
            return CombinedSource([CoinSource(truth, 0.2, 0.9, index, "boastful" if learn else None, wrong_shift=1),
                                   CoinSource(truth, 0.9, 0.3, index + 100, "modest" if learn else None, wrong_shift=2)])
        return make

    _, as_claimed = decode_in_turn(llama, config, prompts, 150, boastful_and_modest(learn=False))
    scheduler, tokens_per_step = decode_in_turn(llama, config, prompts, 150, boastful_and_modest(learn=True))
    confidences = scheduler.confidences
    for context in ((False, False), (False, True)):  # after a miss, after a hit
        boastful, modest = (confidences.probability(key(context, evidence, 1, claimed), claimed)
                            for evidence, claimed in (("boastful", 0.9), ("modest", 0.3)))
        assert boastful < modest, (context, boastful, modest)
        tree = build_tree([Draft((1,), (0.9,), "boastful"), Draft((2,), (0.3,), "modest")], 1, 1, confidences,
                          context)
        assert tree.tokens == (2,)
    most_tried = max(confidences.counts.values(), key=lambda counts: counts[1])
    assert most_tried[0] / most_tried[1] > 0.85  # the modest source's, mostly verified once learned
    assert max(as_claimed) < 1.3 < 1.7 < min(tokens_per_step[1:]), (as_claimed, tokens_per_step)


def test_a_tree_expects_at_most_one_accepted_node_per_depth():
    drafts = [Draft((1, 2), (0.7, 0.5)), Draft((3,), (0.6,)), Draft((1, 4), (0.7, 0.2))]
    tree = build_tree(drafts, 4, 2)
    assert tree.tokens == (1, 3, 2, 4) and tree.parents == (ROOT, ROOT, 0, 0)
    # depth 1: 0.7 + 0.6, capped at 1; depth 2: 0.35 + 0.14
    assert tree.expected == pytest.approx((0.7, 1.0, 1.35, 1.49))
    assert tree.expected_accepted(2) == pytest.approx(1.0) and tree.expected_accepted(0) == 0.0
    assert tree.tested([0]) == [0, 1, 2, 3] and tree.tested([]) == [0, 1]


def test_the_chooser_verifies_when_the_tree_is_worth_its_cost():
    shapes = (LookaheadConfig(1, 2, 0), LookaheadConfig(1, 2, 4, candidate_length=2, tree_nodes=4))
    chooser = ShapeChooser(shapes, (1.0, 1.5), AcceptancePrior(accepted=0.0))
    sure = build_tree([Draft((1, 2), (0.9, 0.9))], 4, 2)  # expects 0.9 + 0.81 tokens: 2.71 / 1.5 > 1 / 1
    unsure = build_tree([Draft((1, 2), (0.3, 0.3))], 4, 2)  # 1.39 / 1.5 < 1
    assert chooser.choose(len(sure), sure) == 1
    assert chooser.choose(len(unsure), unsure) == 0
    assert chooser.choose(4) == 0  # before drafting: the measured mean (none accepted yet) says plain


def test_the_pool_tells_window_ngrams_from_the_texts():
    pool = NGramPool(continuation_length=2, capacity=4)
    pool.add(1, (2, 3), from_window=True)
    pool.add(1, (4, 5), from_window=True)
    pool.add(1, (4, 5))  # also in the text: no longer only the window's
    pool.add(1, (6, 7))
    assert pool.lookup_origins(1) == [((6, 7), False), ((4, 5), False), ((2, 3), True)]
    source = NGramPoolSource(pool, from_text=False)
    assert [d.evidence for d in source.propose([1], 2, 8)] == [FROM_TEXT, FROM_TEXT, FROM_WINDOW]


def test_the_window_is_worth_what_its_ngrams_are_accepted_for_later():
    shapes = (LookaheadConfig(1, 2, 0), LookaheadConfig(1, 2, 4, candidate_length=2, tree_nodes=4),
              LookaheadConfig(4, 3, 4, candidate_length=2, tree_nodes=4))
    costs = (1.0, 1.2, 2.0)
    worthless = ShapeChooser(shapes, costs, AcceptancePrior(accepted=1.0, window_tokens=2.0))
    valued = ShapeChooser(shapes, costs, AcceptancePrior(accepted=1.0, window_tokens=2.0))
    for step in range(40):
        shape = 2 if step % 4 == 0 else 1  # a window step every fourth step
        worthless.observe(shape, 4, [0])
        valued.observe(shape, 4, [0, 1], window_credit=2 if shape == 1 else 0)  # window n-grams accepted later
    assert worthless.window_value == 0.0
    assert valued.window_value == pytest.approx(valued.window_credit / valued.window_rate)
    assert valued.window_value > 3.0  # ~1.5 credited tokens per step over a quarter of steps with the window
    assert worthless.choose(0) != 2 and valued.choose(0) == 2


def test_a_step_reports_the_accepted_tokens_only_window_ngrams_drafted():
    """The batch's yield ratio compares a window step's tokens apart from these (the window's later value stands
    for them), so the sequence hands them back with what it committed."""
    from lookahead_decoding.config import AUTOREGRESSIVE
    from lookahead_decoding.state import Emitter, Recorded, SequenceState
    from lookahead_decoding.step import PlannedStep, StepOutcome
    from lookahead_decoding.tuning import StepPlan

    class Silent(CandidateSource):
        def propose(self, history, max_length, budget):
            return []

    wide = LookaheadConfig(window=2, ngram=3, guesses=2, candidate_length=2, tree_nodes=4)
    plan = StepPlan((AUTOREGRESSIVE, wide), (1.0, 1.5))
    confidences = Confidences()
    sequence = SequenceState([1, 2, 3], plan, Silent(), Emitter([1, 2, 3], 10, set(), None, None, "cpu"),
                             random.Random(0), confidences=confidences)
    # Node 0 (token 7) was drafted by the window's n-gram and the text's; its children only by one or the other.
    tree = build_tree([Draft((7, 8), (0.9, 0.9), FROM_WINDOW), Draft((7, 9), (0.5, 0.5), FROM_TEXT)], 4, 2,
                      confidences, (False, False))
    assert tree.tokens[:3] == (7, 8, 9)
    accepted_8 = StepOutcome(2, [0, 1], [7, 8, 5], [4, 4])
    assert sequence.record(PlannedStep(1, [], tree), accepted_8) == Recorded(committed=3, window_credit=1)
    accepted_9 = StepOutcome(2, [0, 2], [7, 9, 5], [4, 4])
    assert sequence.record(PlannedStep(1, [], tree), accepted_9) == Recorded(committed=3, window_credit=0)
