"""Sampling with lookahead decoding has exactly the output distribution of `model.generate(do_sample=True)`.

The reference is the exact joint distribution of the first three new tokens, enumerated with the model's own
forward on every prefix and the same logits processors. Our sampler and HF's are both compared against it by
a chi-square goodness-of-fit test, with a Bonferroni correction over all comparisons; a deliberately biased
verifier must fail the same test. The 145 000 short generations run in two worker processes (about 4 minutes
on two cores); the other tests are quick.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pytest
import torch
import transformers
from conftest import greedy_reference, tiny_model
from scipy.stats import chisquare
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

import lookahead_decoding as ld
from lookahead_decoding.decoding import decode
from lookahead_decoding.sampling import SamplingVerifier, sampling_processors

torch.set_num_threads(1)

VOCAB = 12
NEW_TOKENS = 3  # the joint distribution of the first three new tokens is compared: VOCAB**3 cells
SAMPLES = 5000
ALPHA = 0.01


@dataclass(frozen=True)
class Case:
    model: tuple[int, float]  # (init seed, logit scale): a larger scale gives sharper distributions
    prompt: str  # "cycle": the model's own greedy continuation, so drafts are often right; "random" otherwise
    ngram: int
    window: int
    guesses: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    penalty: float | None = None  # repetition penalty, given as a logits processor
    candidate_length: int | None = None  # K (default N-1)
    source: tuple[str, ...] | None = None  # the candidate sources (default: the library's); "recycled" branches widely

    def config(self) -> ld.LookaheadConfig:
        return ld.LookaheadConfig(window=self.window, ngram=self.ngram, guesses=self.guesses,
                                  candidate_length=self.candidate_length)

    def processors(self) -> LogitsProcessorList:
        return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(self.penalty)] if self.penalty else [])

    def sampling_kwargs(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, logits_processor=self.processors())


A, B, C, D, E = (2, 2.5), (5, 2.5), (0, 3.5), (4, 3.0), (3, 3.0)
CASES = [
    Case(A, "cycle", ngram=2, window=3, guesses=3),
    Case(A, "cycle", ngram=3, window=3, guesses=3),
    Case(A, "cycle", ngram=4, window=2, guesses=5),
    Case(A, "cycle", ngram=5, window=2, guesses=2, temperature=1.2),
    Case(A, "random", ngram=3, window=4, guesses=5),
    Case(A, "cycle", ngram=3, window=2, guesses=2, temperature=0.5),
    Case(A, "cycle", ngram=2, window=1, guesses=1, temperature=0.7),
    Case(B, "cycle", ngram=3, window=3, guesses=4, temperature=1.3),
    Case(B, "random", ngram=2, window=2, guesses=3, temperature=1.5),
    Case(B, "cycle", ngram=3, window=3, guesses=3, top_k=3),
    Case(B, "cycle", ngram=4, window=2, guesses=3, temperature=1.2, top_k=5),
    Case(C, "cycle", ngram=3, window=3, guesses=3, top_p=0.8),
    Case(C, "random", ngram=3, window=2, guesses=6, temperature=1.4, top_p=0.9),
    Case(C, "cycle", ngram=2, window=3, guesses=2, temperature=0.8, top_k=4, top_p=0.9),
    Case(A, "cycle", ngram=3, window=3, guesses=3, penalty=1.3),
    Case(B, "cycle", ngram=4, window=2, guesses=4, temperature=0.9, penalty=1.3),
    Case(C, "random", ngram=3, window=3, guesses=3, temperature=1.2, top_p=0.9, penalty=1.3),
    Case(D, "cycle", ngram=3, window=1, guesses=0),
    Case(D, "cycle", ngram=3, window=3, guesses=3),
    Case(A, "cycle", ngram=2, window=3, guesses=3, candidate_length=3),
    Case(D, "cycle", ngram=2, window=4, guesses=5, temperature=0.6, top_k=6),
    Case(E, "random", ngram=4, window=3, guesses=2, temperature=1.1, top_p=0.95),
    Case(E, "cycle", ngram=3, window=2, guesses=3, temperature=1.3, penalty=1.3),
    Case(E, "cycle", ngram=2, window=2, guesses=2, top_p=0.7),
    # Trees with several children per node: the model's recycled top-k next tokens, alone or merged with others.
    Case(A, "cycle", ngram=3, window=3, guesses=3, source=("pool", "recycled")),
    Case(B, "random", ngram=2, window=2, guesses=3, temperature=1.5, source=("recycled",)),
    Case(C, "cycle", ngram=3, window=2, guesses=4, top_p=0.9, source=("pool", "suffix", "recycled")),
    Case(E, "cycle", ngram=4, window=2, guesses=3, penalty=1.3, source=("pool", "recycled")),
]
# Cases also run through `model.generate(custom_generate=lookahead_generate)`, which builds its own processors.
THROUGH_HF = [15]
# Every case is tested twice (ours and HF's against the exact distribution), THROUGH_HF ones three times.
THRESHOLD = ALPHA / (2 * len(CASES) + len(THROUGH_HF))


def sampling_model(seed: int, scale: float):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # logits with a standard deviation of about `scale`
        model.lm_head.weight.normal_(0.0, scale / math.sqrt(config.hidden_size))
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, name, None)
    return model


_MODELS: dict = {}


def model_and_prompt(case: Case):
    key = (case.model, case.prompt)
    if key not in _MODELS:
        model = sampling_model(*case.model)
        start = torch.tensor([[case.model[0] % VOCAB, 5, 7]])
        if case.prompt == "cycle":
            prompt = greedy_reference(model, start, 13)
        else:
            prompt = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(case.model[0]))
        _MODELS[key] = model, prompt
    return _MODELS[key]


@torch.inference_mode()
def exact_joint(model, prompt: torch.Tensor, processors: LogitsProcessorList, steps: int) -> torch.Tensor:
    """P(first `steps` new tokens) over all VOCAB**steps sequences, lexicographic order, float64."""
    joint = torch.ones(1, dtype=torch.float64)
    for step in range(steps):
        prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=step)), dtype=torch.long).view(VOCAB**step, step)
        seqs = torch.cat([prompt.expand(prefixes.shape[0], -1), prefixes], dim=1)
        scores = processors(seqs, model(seqs).logits[:, -1].float())
        joint = (joint[:, None] * torch.softmax(scores.double(), dim=-1)).view(-1)
    return joint


def cell(tokens) -> int:
    return sum(int(t) * VOCAB ** (NEW_TOKENS - 1 - i) for i, t in enumerate(tokens))


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value; cells expecting fewer than 5 samples are pooled (zero-probability cells included)."""
    total = float(counts.sum())
    expected = probs / probs.sum() * total
    big = expected >= 5
    observed = counts[big].double().tolist() + [float(counts[~big].sum())]
    expected = expected[big].tolist() + [float(expected[~big].sum())]
    if expected[-1] < 5:  # fold the pooled cell into the smallest kept one
        smallest = min(range(len(expected) - 1), key=expected.__getitem__)
        observed[smallest] += observed.pop()
        expected[smallest] += expected.pop()
    return float(chisquare(observed, expected).pvalue)


def lookahead_counts(index: int, verifier_cls=None, through_hf: bool = False) -> tuple[torch.Tensor, Counter, Counter]:
    """For CASES[index]: first-three-token counts over SAMPLES generations drawing from one generator, the
    histogram of tokens per step, and how often a draft was accepted or rejected.

    With `verifier_cls` (a biased SamplingVerifier) the loop runs with that verifier instead; with
    `through_hf` it runs as `model.generate(custom_generate=lookahead_generate)` (no step histogram then).
    """
    case = CASES[index]
    model, prompt = model_and_prompt(case)
    generator = torch.Generator().manual_seed(index)
    torch.manual_seed(index)  # for the generators that lookahead_generate seeds from the global RNG
    counts = torch.zeros(VOCAB**NEW_TOKENS, dtype=torch.long)
    steps: Counter = Counter()
    outcomes: Counter = Counter()
    choose = SamplingVerifier.choose

    def counting_choose(self, scores, drafts):
        token, accepted = choose(self, scores, drafts)
        if drafts:
            outcomes["accepted" if accepted else "rejected"] += 1
            outcomes["several drafts"] += len(drafts) > 1  # a tree node with several children
        return token, accepted

    SamplingVerifier.choose = counting_choose
    try:
        for _ in range(SAMPLES):
            if through_hf:
                sequences = model.generate(
                    prompt, do_sample=True, max_new_tokens=NEW_TOKENS, temperature=case.temperature,
                    top_k=case.top_k or 0, top_p=case.top_p, logits_processor=case.processors(),
                    custom_generate=ld.lookahead_generate, lookahead_config=case.config(),
                )
                counts[cell(sequences[0, prompt.shape[1]:])] += 1
                continue
            if verifier_cls is None:
                out = ld.generate(model, prompt, NEW_TOKENS, case.config(), do_sample=True, generator=generator,
                                  source=case.source, **case.sampling_kwargs())
                new_tokens, stats = out.sequences[0, prompt.shape[1]:], out.stats
            else:
                (result,), stats, _ = decode(model, prompt.tolist(), NEW_TOKENS, case.config(), source=case.source,
                                             verifier=verifier_cls(generator, **case.sampling_kwargs()))
                new_tokens = torch.tensor(result.tokens[prompt.shape[1]:])
            counts[cell(new_tokens)] += 1
            steps.update(stats.accepted_histogram)
    finally:
        SamplingVerifier.choose = choose
    return counts, steps, outcomes


def in_parallel(function, arguments: list[tuple]) -> list:
    """function(*args) for each args, in two worker processes where there are two cores (CPU-bound loops)."""
    if len(os.sched_getaffinity(0)) < 2:
        return [function(*args) for args in arguments]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(function, *zip(*arguments)))


def exact_distribution(case: Case) -> torch.Tensor:
    model, prompt = model_and_prompt(case)
    warped = sampling_processors(case.processors(), case.temperature, case.top_k, case.top_p)
    return exact_joint(model, prompt, warped, NEW_TOKENS)


def hf_counts(case: Case, seed: int) -> torch.Tensor:
    model, prompt = model_and_prompt(case)
    torch.manual_seed(seed)
    batch = prompt.expand(SAMPLES, -1).contiguous()
    out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, max_new_tokens=NEW_TOKENS,
                         temperature=case.temperature, top_k=case.top_k or 0, top_p=case.top_p,
                         logits_processor=case.processors())
    return torch.bincount(torch.tensor([cell(row) for row in out[:, prompt.shape[1]:].tolist()]),
                          minlength=VOCAB**NEW_TOKENS)


def test_sampling_matches_the_exact_distribution():
    start = time.perf_counter()
    tasks = [(index, None, False) for index in range(len(CASES))] + [(index, None, True) for index in THROUGH_HF]
    results = in_parallel(lookahead_counts, tasks)
    p_ours, p_hf, steps, outcomes = [], [], Counter(), Counter()
    for (index, _, _), (counts, case_steps, case_outcomes) in zip(tasks, results):
        exact = exact_distribution(CASES[index])
        p_ours.append(goodness_of_fit(counts, exact))
        steps.update(case_steps)
        outcomes.update(case_outcomes)
    for index, case in enumerate(CASES):
        p_hf.append(goodness_of_fit(hf_counts(case, seed=index), exact_distribution(case)))
    summary = (f"{len(tasks)} runs x {SAMPLES} samples in {time.perf_counter() - start:.0f} s; "
               f"min p ours {min(p_ours):.3g}, HF {min(p_hf):.3g}; threshold {THRESHOLD:.2g}; "
               f"tokens per step {dict(sorted(steps.items()))}; drafts {dict(outcomes)}")
    print(summary)
    print("p ours:", " ".join(f"{p:.3g}" for p in p_ours))
    print("p HF:  ", " ".join(f"{p:.3g}" for p in p_hf))
    assert min(p_hf) >= THRESHOLD, f"the exact reference disagrees with HF sampling: {p_hf}"
    assert min(p_ours) >= THRESHOLD, f"lookahead sampling differs from the exact distribution: {p_ours}"
    # The test only means something if drafts are both accepted and rejected, and multi-token steps happen.
    assert outcomes["accepted"] > 10_000 and outcomes["rejected"] > 10_000, summary
    assert outcomes["several drafts"] > 5_000, summary
    assert sum(count for tokens, count in steps.items() if tokens >= 2) > 10_000, summary


class SqrtVerifier(SamplingVerifier):
    """Biased: accepts a draft with probability sqrt(P(x)), too often."""

    def acceptance(self, probs, remaining):
        return super().acceptance(probs, remaining).sqrt()


class AlwaysAcceptVerifier(SamplingVerifier):
    """Biased: accepts the first draft whenever it has any probability at all."""

    def acceptance(self, probs, remaining):
        return (probs > 0).to(probs.dtype)


def test_the_distribution_test_detects_biased_verifiers():
    index = 1
    biased = [SqrtVerifier, AlwaysAcceptVerifier]
    results = in_parallel(lookahead_counts, [(index, verifier) for verifier in biased])
    exact = exact_distribution(CASES[index])
    p_values = [goodness_of_fit(counts, exact) for counts, _, _ in results]
    print("biased verifiers:", dict(zip([v.__name__ for v in biased], p_values)))
    assert max(p_values) < ALPHA


def sample(model, prompt, **kwargs):
    kwargs.setdefault("config", ld.LookaheadConfig(window=3, ngram=4, guesses=3))
    return ld.generate(model, prompt, kwargs.pop("max_new_tokens", 24), do_sample=True, **kwargs).sequences


def test_same_seed_same_output():
    model, prompt = model_and_prompt(CASES[6])
    runs = [sample(model, prompt, temperature=1.3, generator=torch.Generator().manual_seed(seed)).tolist()
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # Without a generator the global RNG seeds one: torch.manual_seed makes runs reproducible.
    torch.manual_seed(3)
    first = sample(model, prompt, temperature=1.3)
    torch.manual_seed(3)
    assert sample(model, prompt, temperature=1.3).tolist() == first.tolist()


@pytest.mark.parametrize("ngram, candidate_length", [(2, None), (4, None), (3, 6)])
def test_tiny_temperature_is_greedy(ngram, candidate_length):
    model = tiny_model("llama")
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6] * 3])
    config = ld.LookaheadConfig(window=4, ngram=ngram, guesses=4, candidate_length=candidate_length)
    out = ld.generate(model, prompt, 40, config, do_sample=True, temperature=1e-6,  # this model has near ties (2e-4)
                      generator=torch.Generator().manual_seed(0))
    assert out.sequences.tolist() == greedy_reference(model, prompt, 40).tolist()
    assert max(out.stats.accepted_histogram) >= 2  # drafts were accepted along the way


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("ngram, candidate_length", [(2, None), (3, None), (5, None), (3, 6)])
def test_greedy_with_logits_processors_equals_hf(arch, ngram, candidate_length):
    model = tiny_model(arch)
    prompt = torch.tensor([[5, 6, 7, 8] * 5])
    processors = [RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(4)]
    expected = greedy_reference(model, prompt, 40, logits_processor=LogitsProcessorList(processors))
    config = ld.LookaheadConfig(window=4, ngram=ngram, guesses=5, candidate_length=candidate_length)
    out = ld.generate(model, prompt, 40, config, logits_processor=LogitsProcessorList(processors))
    assert out.sequences.tolist() == expected.tolist()
    assert expected.tolist() != greedy_reference(model, prompt, 40).tolist()  # the processors mattered


def test_sampling_stops_at_eos_and_max_new_tokens():
    model, prompt = model_and_prompt(CASES[0])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = ld.generate(model, prompt, 12, ld.LookaheadConfig(3, 4, 3), do_sample=True, eos_token_id=2,
                          generator=generator)
        new = out.sequences[0, prompt.shape[1]:].tolist()
        assert len(new) == out.stats.new_tokens <= 12
        assert 2 not in new[:-1] and (len(new) == 12 or new[-1] == 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), "temperature must be a finite number > 0"),
        (dict(temperature=math.nan), "temperature must be a finite number > 0"),
        (dict(temperature="hot"), "temperature must be a finite number > 0"),
        (dict(top_k=-1), "top_k must be None or an integer >= 0"),
        (dict(top_k=2.5), "top_k must be None or an integer >= 0"),
        (dict(top_k=True), "top_k must be None or an integer >= 0"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(generator=42), "generator must be a torch.Generator, got int"),
        (dict(do_sample="yes"), "do_sample must be True or False"),
        (dict(logits_processor=[42]), "logits_processor must be a LogitsProcessorList"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    model = tiny_model("llama")
    kwargs = {"do_sample": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        ld.generate(model, torch.tensor([[1, 2, 3]]), 4, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "ignored"),
    [(dict(temperature=0.5, top_p=0.9), "temperature, top_p"), (dict(temperature=0.0, top_k=3), "temperature, top_k")],
)
def test_sampling_arguments_are_ignored_with_a_warning_when_greedy(kwargs, ignored):
    model = tiny_model("llama")
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match=f"do_sample=False decodes greedily; ignoring {ignored}"):
        out = ld.generate(model, prompt, 8, **kwargs)
    assert out.sequences.tolist() == greedy_reference(model, prompt, 8).tolist()


def test_lookahead_generate_applies_transformers_processors():
    model = tiny_model("llama")
    prompt = torch.tensor([[5, 6, 7, 8] * 5])
    through = dict(custom_generate=ld.lookahead_generate, lookahead_config=ld.LookaheadConfig(4, 3, 4), max_new_tokens=30)
    expected = greedy_reference(model, prompt, 30, repetition_penalty=1.3)
    assert model.generate(prompt, do_sample=False, repetition_penalty=1.3, **through).tolist() == expected.tolist()
    # top_k=1 leaves one token to sample: greedy again.
    greedy = greedy_reference(model, prompt, 30)
    assert model.generate(prompt, do_sample=True, top_k=1, **through).tolist() == greedy.tolist()
    torch.manual_seed(5)
    first = model.generate(prompt, do_sample=True, temperature=1.5, **through)
    torch.manual_seed(5)
    assert model.generate(prompt, do_sample=True, temperature=1.5, **through).tolist() == first.tolist()
    assert first.tolist() != greedy.tolist()
