"""Sampling with lookahead decoding has exactly the output distribution of `model.generate(do_sample=True)`.

The reference is the exact joint distribution of the first three new tokens, enumerated with the model's own
forward on every prefix and the same logits processors. Samples are compared against it by a chi-square
goodness-of-fit test, with a Bonferroni correction over all comparisons of a test; deliberately biased samplers
must fail the same test. Two paths are tested:

- on the device (`row_sampler.py`): thousands of rows with their own seeds decode as one batch, rows with
  different parameters (greedy ones too) side by side; and lookahead commits exactly the tokens of plain sampling
  with the same seed, alone or in any batch;
- on the host, under logits processors (`SamplingVerifier`): HF's sampler is compared too. A quarter of the cases
  decode one sequence at a time, the others as batches of rows (the batch engine's host path, whose prefill once
  took the argmax instead of a draw). Their 72 500 short generations run in two worker processes (about 1.5
  minutes on two cores).
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
from conftest import VOCAB as VOCAB_TINY
from conftest import greedy_reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          SuppressTokensLogitsProcessor)

import lookahead_decoding as ld
from lookahead_decoding import row_sampler
from lookahead_decoding.draws import race_noise, stream_keys
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.decoding import decode, open_scheduler
from lookahead_decoding.sampling import SamplingVerifier, same_device, sampling_processors
from lookahead_decoding.sampling_params import SamplingParams
from lookahead_decoding.tuning import shape_name, time_steps

torch.set_num_threads(1)

VOCAB = 12
NEW_TOKENS = 3  # the joint distribution of the first three new tokens is compared: VOCAB**3 cells
SAMPLES = 2500
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
    min_p: float = 0.0
    presence: float = 0.0  # presence and frequency penalties (device path only)
    frequency: float = 0.0

    def config(self) -> ld.LookaheadConfig:
        return ld.LookaheadConfig(window=self.window, ngram=self.ngram, guesses=self.guesses,
                                  candidate_length=self.candidate_length)

    def processors(self, prompt_length: int = 0) -> LogitsProcessorList:
        """The penalties as HF logits processors (for the host path and the exact reference)."""
        processors = [RepetitionPenaltyLogitsProcessor(self.penalty)] if self.penalty else []
        if self.presence or self.frequency:
            processors.append(OutputPenalties(prompt_length, self.presence, self.frequency))
        return LogitsProcessorList(processors)

    def sampling_kwargs(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    logits_processor=self.processors())

    def params(self, seed: int) -> SamplingParams:
        """The same sampling as the device takes it."""
        return SamplingParams(self.temperature, self.top_k or 0, self.top_p, self.min_p, self.penalty or 1.0,
                              self.presence, self.frequency, seed)


class OutputPenalties:
    """The OpenAI presence and frequency penalties as a HF logits processor: over the tokens after the prompt."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        output = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.presence * (counts > 0) - self.frequency * counts


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
# The host path's cases run one sequence at a time (every fourth) or as batches of this many rows, four times faster.
BATCH_ROWS = 250
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


def lookahead_counts(index: int, verifier_cls=None, through_hf: bool = False, rows: int = 1
                     ) -> tuple[torch.Tensor, Counter, Counter]:
    """For CASES[index]: first-three-token counts over SAMPLES generations drawing from one generator, the
    histogram of tokens per step, and how often a draft was accepted or rejected.

    The loop runs on the host path, with `verifier_cls` (SamplingVerifier, or a biased one), one sequence at a
    time or, with `rows` > 1, as batches of that many copies of the prompt (the batch engine's rows, each drawn
    in turn from the same generator); with `through_hf` it runs as `model.generate(custom_generate=
    lookahead_generate)` (no step histogram then).
    """
    verifier_cls = verifier_cls or SamplingVerifier
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
        for _ in range(SAMPLES // rows):
            if through_hf:
                batch = prompt.expand(rows, -1)
                sequences = model.generate(
                    batch, attention_mask=torch.ones_like(batch), do_sample=True, max_new_tokens=NEW_TOKENS,
                    temperature=case.temperature, top_k=case.top_k or 0, top_p=case.top_p,
                    logits_processor=case.processors(), custom_generate=ld.lookahead_generate,
                    lookahead_config=case.config(),
                )
                for row in sequences[:, prompt.shape[1]:]:
                    counts[cell(row)] += 1
                continue
            results, stats, _ = decode(model, prompt.tolist() * rows, NEW_TOKENS, case.config(), source=case.source,
                                       verifier=verifier_cls(generator, **case.sampling_kwargs()))
            for result in results:
                counts[cell(result.tokens[prompt.shape[1]:])] += 1
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
    warped = sampling_processors(case.processors(prompt.shape[1]), case.temperature, case.top_k, case.top_p,
                                 case.min_p)
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


def test_host_sampling_matches_the_exact_distribution():
    start = time.perf_counter()
    tasks = [(index, None, False, 1 if index % 4 == 0 else BATCH_ROWS) for index in range(len(CASES))]
    tasks += [(index, None, True, BATCH_ROWS) for index in THROUGH_HF]
    results = in_parallel(lookahead_counts, tasks)
    p_ours, p_hf, steps, outcomes = [], [], Counter(), Counter()
    for (index, *_), (counts, case_steps, case_outcomes) in zip(tasks, results):
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
@pytest.mark.parametrize("ngram, candidate_length, device_drafts",
                         [(2, None, False), (3, None, False), (5, None, False), (3, 6, False), (2, 6, True)])
def test_greedy_with_logits_processors_equals_hf(arch, ngram, candidate_length, device_drafts):
    model = tiny_model(arch)
    prompt = torch.tensor([[5, 6, 7, 8] * 5])
    processors = [RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(4)]
    expected = greedy_reference(model, prompt, 40, logits_processor=LogitsProcessorList(processors))
    config = ld.LookaheadConfig(window=1 if device_drafts else 4, ngram=ngram, guesses=5,
                                candidate_length=candidate_length, device_drafts=device_drafts)
    out = ld.generate(model, prompt, 40, config, logits_processor=LogitsProcessorList(processors))
    assert out.sequences.tolist() == expected.tolist()
    assert expected.tolist() != greedy_reference(model, prompt, 40).tolist()  # the processors mattered


def test_a_batch_under_logits_processors_equals_hf_row_by_row():
    """Each row of a batch decoded greedily under logits processors gets what HF gives it alone, its first new
    token included (the batch engine's prefill chooses it through the processors too)."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB_TINY, (int(n),), generator=generator).tolist()
               for n in torch.randint(4, 12, (6,), generator=generator)]
    plain_first = {greedy_reference(model, torch.tensor([prompt]), 1)[0, -1].item() for prompt in prompts}
    # Every row's unprocessed first token is suppressed: the processors decide each first token.
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(sorted(plain_first)),
                                      RepetitionPenaltyLogitsProcessor(1.5)])
    expected = [greedy_reference(model, torch.tensor([prompt]), 20, logits_processor=processors)[0].tolist()
                for prompt in prompts]
    out = ld.generate(model, prompts, 20, ld.LookaheadConfig(3, 3, 3), logits_processor=processors, batch_size=3)
    assert [row.tokens for row in out.rows] == expected


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


# ------------------------------------------------------------------------------------------------ on the device

DEVICE_CASES = [
    Case(A, "cycle", ngram=3, window=3, guesses=3),
    Case(B, "cycle", ngram=4, window=2, guesses=3, temperature=1.2, top_k=5),
    Case(C, "random", ngram=3, window=2, guesses=6, temperature=1.4, top_p=0.9),
    Case(A, "cycle", ngram=3, window=3, guesses=3, penalty=1.3, presence=0.4, frequency=0.3),
    Case(E, "cycle", ngram=3, window=2, guesses=3, temperature=0.8, min_p=0.1, source=("pool", "recycled")),
    Case(D, "cycle", ngram=4, window=3, guesses=4, temperature=0.9, top_p=0.95, penalty=1.2, frequency=0.5),
]
DEVICE_SAMPLES = 4000


def device_tokens(rows: list[tuple[Case, int]], config: ld.LookaheadConfig, batch_size: int = 500):
    """The first NEW_TOKENS tokens of each row (case, seed) decoded on the device with lookahead `config`, all rows in
    batches of `batch_size`; and the run's statistics. The rows share their cases' model and prompt."""
    model, prompt = model_and_prompt(rows[0][0])
    sampling = [case.params(seed) if case.temperature else None for case, seed in rows]
    results, stats, _ = decode(model, [prompt[0].tolist()] * len(rows), NEW_TOKENS, config, batch_size=batch_size,
                               sampling=sampling, source=rows[0][0].source)
    return [result.tokens[prompt.shape[1]:] for result in results], stats


def joint_counts(token_rows) -> torch.Tensor:
    return torch.bincount(torch.tensor([cell(tokens) for tokens in token_rows]), minlength=VOCAB**NEW_TOKENS)


def test_device_sampling_matches_the_exact_distribution():
    p_values, multi_token_steps = [], 0
    for index, case in enumerate(DEVICE_CASES):
        tokens, stats = device_tokens([(case, 10**6 * index + seed) for seed in range(DEVICE_SAMPLES)], case.config())
        p_values.append(goodness_of_fit(joint_counts(tokens), exact_distribution(case)))
        multi_token_steps += sum(count for committed, count in stats.accepted_histogram.items() if committed >= 2)
    print("p device:", " ".join(f"{p:.3g}" for p in p_values), "multi-token row-steps:", multi_token_steps)
    assert min(p_values) >= ALPHA / len(DEVICE_CASES), p_values
    assert multi_token_steps > 2000  # drafts were accepted: the test covers verification, not only plain steps


def test_rows_with_different_parameters_share_a_batch():
    """Greedy rows and rows of two sampling cases, interleaved in one batch: every sampled row keeps its own case's
    distribution and every greedy row is HF's greedy output. The cases share a model and a prompt."""
    first, second = DEVICE_CASES[0], DEVICE_CASES[3]
    greedy = Case(first.model, first.prompt, first.ngram, first.window, first.guesses, temperature=0.0)
    rows = [((first, second, greedy)[index % 3], index) for index in range(3 * 2500)]
    tokens, _ = device_tokens(rows, ld.LookaheadConfig(3, 3, 3))
    model, prompt = model_and_prompt(first)
    expected_greedy = greedy_reference(model, prompt, NEW_TOKENS)[0, prompt.shape[1]:].tolist()
    assert all(row == expected_greedy for row in tokens[2::3])
    p_values = [goodness_of_fit(joint_counts(tokens[offset::3]), exact_distribution(case))
                for offset, case in enumerate((first, second))]
    assert min(p_values) >= ALPHA / 2, p_values


def sharper_noise(keys, tokens):
    """Biased: noise scaled down, so likely tokens win too often (a lower temperature than asked for)."""
    return 0.8 * race_noise(keys, tokens)


def position_blind_keys(seeds, positions):
    """Biased: one key for every position of a row, so its draws repeat from position to position."""
    return stream_keys(seeds, torch.zeros_like(positions))


@pytest.mark.parametrize("target, biased", [("race_noise", sharper_noise), ("stream_keys", position_blind_keys)])
def test_the_device_distribution_test_detects_biased_samplers(target, biased, monkeypatch):
    monkeypatch.setattr(row_sampler, target, biased)
    case = DEVICE_CASES[1]
    tokens, _ = device_tokens([(case, seed) for seed in range(DEVICE_SAMPLES)], case.config())
    assert goodness_of_fit(joint_counts(tokens), exact_distribution(case)) < ALPHA


SEEDED = dict(do_sample=True, temperature=0.6, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.2)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    arch=st.sampled_from(["llama", "qwen3", "gpt2", "gpt_neox", "phi3"]),
    motifs=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4), min_size=1, max_size=5),
    config=st.sampled_from([ld.LookaheadConfig(2, 3, 2), ld.LookaheadConfig(4, 4, 3), ld.LookaheadConfig(3, 2, 4),
                            ld.LookaheadConfig(1, 2, 1, candidate_length=3, tree_nodes=8, device_drafts=True),
                            ld.LookaheadConfig(3, 3, 2, candidate_length=3, tree_nodes=10, device_drafts=True)]),
    data=st.data(),
    sampling=st.sampled_from([SEEDED, dict(do_sample=True, temperature=1.1, top_k=4, min_p=0.05),
                              dict(do_sample=False, repetition_penalty=1.3, frequency_penalty=0.4)]),
)
def test_lookahead_commits_the_tokens_of_plain_sampling(arch, motifs, config, data, sampling):
    """Every draw is keyed by (seed, position, token): whatever the drafts, the step shape and the batch, a row
    commits the tokens that plain sampling with its seed commits (float32)."""
    model = tiny_model(arch)
    prompts = [(motif * 12)[: 4 + 3 * index] for index, motif in enumerate(motifs)]
    seeds = [data.draw(st.integers(0, 2**63 - 1), label=f"seed {index}") for index in range(len(prompts))]
    batch_size = data.draw(st.integers(1, len(prompts)), label="batch_size")
    plain = ld.generate(model, prompts, 24, AUTOREGRESSIVE, seed=seeds if sampling["do_sample"] else None,
                        batch_size=batch_size, **sampling)
    out = ld.generate(model, prompts, 24, config, seed=seeds if sampling["do_sample"] else None,
                      batch_size=batch_size, **sampling)
    assert [row.tokens for row in out.rows] == [row.tokens for row in plain.rows]
    alone = ld.generate(model, prompts[-1:], 24, config, seed=seeds[-1:] if sampling["do_sample"] else None,
                        **sampling)
    assert alone.rows[0].tokens == plain.rows[-1].tokens


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_batches_of_8_and_64():
    model, prompt = model_and_prompt(DEVICE_CASES[0])
    generator = torch.Generator().manual_seed(9)
    others = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
              for n in torch.randint(2, 20, (63,), generator=generator)]
    request = prompt[0].tolist()
    config = ld.LookaheadConfig(3, 3, 3)
    kwargs = dict(do_sample=True, temperature=0.9, top_p=0.95)
    alone = ld.generate(model, [request], 30, config, seed=[77], **kwargs)
    for batch in (8, 64):
        prompts = others[:3] + [request] + others[3 : batch - 1]
        seeds = list(range(len(prompts)))
        seeds[3] = 77
        out = ld.generate(model, prompts, 30, config, seed=seeds, **kwargs)
        assert out.rows[3].tokens == alone.rows[0].tokens
    assert out.stats.tokens_per_step > 1.3  # drafts were accepted: verification decided, not plain steps


def test_seeds_per_prompt():
    model, prompt = model_and_prompt(DEVICE_CASES[0])
    prompts = [prompt[0].tolist()] * 3
    batch = ld.generate(model, prompts, 12, do_sample=True, seed=40)
    assert [row.tokens for row in batch.rows] == [
        ld.generate(model, prompts[:1], 12, do_sample=True, seed=40 + index).rows[0].tokens for index in range(3)]
    assert len({tuple(row.tokens) for row in batch.rows}) > 1  # an int seeds the batch, not every row alike
    with pytest.raises(ValueError, match="seed has 2 values for 3 prompts; give one per prompt or one int"):
        ld.generate(model, prompts, 4, do_sample=True, seed=[1, 2])
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        ld.generate(model, prompts, 4, do_sample=True, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        ld.generate(model, prompts[:1], 4, do_sample=True, seed=[-1])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.5, "temperature must be a finite number >= 0"),
        ("top_k", 1.5, "top_k must be an integer >= 0"),
        ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
        ("min_p", 1.5, r"min_p must be a number in \[0, 1\]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0"),
        ("presence_penalty", math.inf, "presence_penalty must be a finite number"),
        ("frequency_penalty", "high", "frequency_penalty must be a finite number"),
        ("seed", 2**63, r"seed must be an integer in \[0, 2\*\*63\)"),
    ],
)
def test_bad_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_greedy_with_a_repetition_penalty_runs_on_the_device_and_equals_hf():
    model = tiny_model("llama")
    prompt = torch.tensor([[5, 6, 7, 8] * 5])
    out = ld.generate(model, prompt, 40, ld.LookaheadConfig(4, 3, 4), repetition_penalty=1.3)
    expected = greedy_reference(model, prompt, 40, repetition_penalty=1.3)
    assert out.sequences.tolist() == expected.tolist() != greedy_reference(model, prompt, 40).tolist()


def test_presence_penalties_do_not_combine_with_logits_processors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="presence_penalty and frequency_penalty do not combine with logits_processor"):
        ld.generate(model, torch.tensor([[1, 2, 3]]), 4, presence_penalty=0.5,
                    logits_processor=[RepetitionPenaltyLogitsProcessor(1.2)])


def test_a_greedy_engine_refuses_sampled_requests():
    model = tiny_model("llama")
    engine = ld.StaticStep(model, AUTOREGRESSIVE, 32)
    scheduler = ld.BatchScheduler(engine, ld.StepPlan((AUTOREGRESSIVE,), (1.0,)), lambda: None)
    with pytest.raises(ValueError, match="request 'x' samples or has penalties, but this scheduler's step runner is "
                                         "greedy; build it with sampling=True"):
        scheduler.submit(ld.Request([1, 2], 4, tag="x", sampling=SamplingParams(temperature=0.5)))


def test_an_engine_built_to_sample_judges_greedy_steps_by_their_own_cost():
    """A plan that costs its sampled steps apart (`StepPlan.greedy_costs_ms`): a lookahead step that pays only
    when no row samples is taken for a greedy request, and never while the row samples."""
    model = tiny_model("llama")
    shape = ld.LookaheadConfig(3, 4, 3)
    plan = ld.StepPlan((AUTOREGRESSIVE, shape), costs_ms=(1.0, 1000.0), greedy_costs_ms=(1.0, 1.0))
    scheduler = open_scheduler(model, 1, 96, plan)
    prompt = [5, 9, 2, 7, 5, 9]
    scheduler.submit(ld.Request(prompt, 40))
    (greedy,) = scheduler.run()
    assert greedy.tokens == greedy_reference(model, torch.tensor([prompt]), 40)[0].tolist()
    lookahead_steps = scheduler.steps_by_shape.get(shape_name(shape), 0)
    assert lookahead_steps > 0, scheduler.steps_by_shape
    scheduler.submit(ld.Request(prompt, 40, sampling=SamplingParams(temperature=0.8, seed=3)))
    (sampled,) = scheduler.run()
    assert scheduler.steps_by_shape.get(shape_name(shape), 0) == lookahead_steps


@pytest.mark.parametrize("sampling, takes_lookahead", [
    (SamplingParams(temperature=0.8, seed=3), True), (SamplingParams(temperature=0.8, top_p=0.9, seed=3), False)])
def test_a_row_sampling_without_a_sort_is_judged_by_unsorted_steps_costs(sampling, takes_lookahead):
    """A plan that costs steps whose rows draw without sorting the vocabulary apart (`StepPlan.unsorted_costs_ms`):
    a lookahead step that pays only at those costs is taken for a request with a temperature alone, never for one
    that filters by top-p."""
    model = tiny_model("llama")
    shape = ld.LookaheadConfig(3, 4, 3)
    plan = ld.StepPlan((AUTOREGRESSIVE, shape), costs_ms=(1.0, 1000.0), greedy_costs_ms=(1.0, 1000.0),
                       unsorted_costs_ms=(1.0, 1.0))
    scheduler = open_scheduler(model, 1, 96, plan)
    scheduler.submit(ld.Request([5, 9, 2, 7, 5, 9], 40, sampling=sampling))
    (sampled,) = scheduler.run()
    assert (scheduler.steps_by_shape.get(shape_name(shape), 0) > 0) == takes_lookahead, scheduler.steps_by_shape


def test_a_finished_sampled_request_stops_the_batchs_sampling_stages():
    """Once a sampled request's row is free, the batch's steps stop running its sampling stages: the greedy row
    beside it is judged by greedy steps' costs again and takes the lookahead step that pays only when no row
    samples."""
    model = tiny_model("llama")
    shape = ld.LookaheadConfig(3, 4, 3)
    plan = ld.StepPlan((AUTOREGRESSIVE, shape), costs_ms=(1.0, 1000.0), greedy_costs_ms=(1.0, 1.0))
    scheduler = open_scheduler(model, 2, 96, plan)
    prompt = [5, 9, 2, 7, 5, 9]
    scheduler.submit(ld.Request(prompt, 3, tag="sampled", sampling=SamplingParams(temperature=0.8, seed=3)))
    scheduler.submit(ld.Request(prompt, 40, tag="greedy"))
    finished = {result.tag: result for result in scheduler.run()}
    assert scheduler.runner.sampler.stages == ()
    assert scheduler.steps_by_shape.get(shape_name(shape), 0) > 0, scheduler.steps_by_shape
    assert finished["greedy"].tokens == greedy_reference(model, torch.tensor([prompt]), 40)[0].tolist()


def test_timing_a_sampling_engine_leaves_its_rows_greedy():
    """Timing a shape decodes a sampled sequence in row 0 (`time_steps`, as `auto` on a compiled engine does when a
    server starts); once timed, the engine's steps run no sampling stage until a request samples."""
    engine = ld.StaticStep(tiny_model("llama"), (AUTOREGRESSIVE, ld.LookaheadConfig(3, 4, 3)), 96, cuda_graph=False,
                           sampling=True)
    costs = time_steps(engine, VOCAB_TINY, sampling=SamplingParams(temperature=0.7, top_p=0.9))
    assert len(costs) == 2 and engine.sampler.stages == ()


def test_capturing_sampled_steps_needs_an_engine_that_samples_on_cuda():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="this engine is greedy: build it with sampling=True to capture sampled steps"):
        ld.StaticStep(model, AUTOREGRESSIVE, 32).capture_sampling(SamplingParams(temperature=0.7))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; this engine's model is on cpu"):
        ld.StaticStep(model, AUTOREGRESSIVE, 32, sampling=True).capture_sampling(SamplingParams(temperature=0.7))


def test_cuda_names_the_current_device():
    assert same_device("cuda", "cuda:0") and same_device(torch.device("cuda:0"), "cuda")
    assert not same_device("cuda", "cpu") and not same_device("cuda:1", "cuda:0")


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]), top_k=st.sampled_from([0, 1, 3, 10, 40, 300]),
    top_p=st.sampled_from([1.0, 0.3, 0.9, 0.99]), min_p=st.sampled_from([0.0, 0.05]),
    repetition_penalty=st.sampled_from([1.0, 1.3]), presence_penalty=st.sampled_from([0.0, 0.5]),
    frequency_penalty=st.sampled_from([0.0, -0.2]), seed=st.integers(0, 2**63 - 1),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.lists(params_strategy, min_size=1, max_size=4), head=st.sampled_from([4, 16, 64]),
       sharpness=st.sampled_from([0.5, 3.0, 8.0]), data=st.data())
def test_skipping_unused_stages_chooses_the_same_tokens(rows, head, sharpness, data):
    """A sampler runs only the stages its rows use, and outside a graph sorts only the head of the vocabulary when
    it holds every token top-k and top-p keep (`head` tokens here, to reach both branches): it chooses what running
    every stage over a full sort chooses."""
    vocab, positions = 300, 3
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="logits seed"))
    logits = torch.randn(len(rows), positions, vocab, generator=generator) * sharpness
    history = torch.randint(0, vocab, (len(rows), 6), generator=generator)
    choices = []
    for every_stage, head_tokens in ((True, vocab), (False, head)):
        sampler = row_sampler.RowSampler(len(rows), vocab, "cpu")
        sampler.start_rows(dict(enumerate(rows)))
        if every_stage:
            sampler.stages = row_sampler.STAGES
        sampler.observe_prompt(history[:, :3], torch.ones(len(rows), 3, dtype=torch.bool))
        sampler.observe_output(history[:, 3:], torch.ones(len(rows), 3, dtype=torch.bool))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(row_sampler, "HEAD_TOKENS", head_tokens)
            choices.append(sampler.choose(logits, torch.arange(positions).expand(len(rows), -1) + 6))
    assert choices[0].tolist() == choices[1].tolist()


def test_a_compiled_sampled_step_chooses_in_one_graph_what_eager_chooses():
    """Compiled (`serve --compile`), every stage traces into one graph: the head-of-vocabulary shortcut syncs with
    the host, and a step split there could not be captured as a CUDA graph (it failed so on the H100 for top-p
    requests). The full sort chooses the same tokens."""
    vocab, positions = 2 * row_sampler.HEAD_TOKENS, 3
    rows = [SamplingParams(temperature=0.7, top_p=0.9, seed=1), SamplingParams(temperature=1.2, top_k=20, min_p=0.01,
                                                                               repetition_penalty=1.3, seed=2), None]
    sampler = row_sampler.RowSampler(len(rows), vocab, "cpu")
    sampler.start_rows(dict(enumerate(rows)))
    logits = torch.randn(len(rows), positions, vocab, generator=torch.Generator().manual_seed(3)) * 4
    at = torch.arange(positions).expand(len(rows), -1) + 6
    compiled = torch.compile(sampler.choose, backend="eager", fullgraph=True)  # fullgraph: a split step raises
    assert compiled(logits, at).tolist() == sampler.choose(logits, at).tolist()
