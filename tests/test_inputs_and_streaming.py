"""Stopping, streaming and bad input on tiny models."""

import pytest
import torch
import transformers
from conftest import VOCAB, greedy_reference, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import lookahead_decoding as ld


class StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def repetitive_prompt():
    return torch.tensor([[5, 17, 42, 8] * 4])


def test_stopping_criteria_cut_inside_an_accepted_block(llama):
    input_ids = repetitive_prompt()
    free = greedy_reference(llama, input_ids, 40)
    stop_token = int(free[0, input_ids.shape[1] + 17])
    expected = greedy_reference(llama, input_ids, 40, stopping_criteria=StoppingCriteriaList([StopOnToken(stop_token)]))
    out = ld.generate(llama, input_ids, 40, ld.LookaheadConfig(4, 5, 4),
                      stopping_criteria=StoppingCriteriaList([StopOnToken(stop_token)]))
    assert out.sequences.tolist() == expected.tolist()
    assert out.sequences.shape[1] < free.shape[1]
    assert max(out.stats.accepted_histogram) > 1  # the stop landed in a run of multi-token steps


def test_stopping_criteria_may_be_a_plain_list_as_hf_generate_takes_them(llama):
    input_ids = repetitive_prompt()
    stop_token = int(greedy_reference(llama, input_ids, 40)[0, input_ids.shape[1] + 17])
    as_list = ld.generate(llama, input_ids, 40, ld.LookaheadConfig(4, 5, 4), stopping_criteria=[StopOnToken(stop_token)])
    expected = greedy_reference(llama, input_ids, 40, stopping_criteria=StoppingCriteriaList([StopOnToken(stop_token)]))
    assert as_list.sequences.tolist() == expected.tolist()
    with pytest.raises(TypeError, match="stopping_criteria must be a StoppingCriteria .* or a list of them, got 5"):
        ld.generate(llama, input_ids, 4, stopping_criteria=5)


class RecordIds(StoppingCriteria):
    """Never stops; keeps every input_ids it is given (and so their storage alive)."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_stopping_criteria_see_every_token_from_one_copy_of_the_ids_per_step(llama):
    """After every committed token, as HF generate checks them; the ids of one step's tokens are views of one
    tensor made for the step, not the whole history copied for each token."""
    input_ids = repetitive_prompt()
    criterion = RecordIds()
    out = ld.generate(llama, input_ids, 30, ld.LookaheadConfig(4, 5, 4), stopping_criteria=StoppingCriteriaList([criterion]))
    final = out.sequences[0].tolist()
    # Every new token but the last, which max_new_tokens stops at before the criteria are asked.
    assert [ids[0].tolist() for ids in criterion.seen] == [final[:length] for length in range(17, len(final))]
    copies = {ids.untyped_storage().data_ptr() for ids in criterion.seen}
    # At most one per step and the prefill's token (not one per token: multi-token steps happened)
    assert len(copies) <= out.stats.steps + 1 < len(criterion.seen)


class RecordScores(StoppingCriteria):
    """Stops once the chosen token's logit falls below a threshold, recording every scores tensor it gets. HF
    generate passes a [batch, V] tensor, as StoppingCriteria documents, or, with output_scores, the tuple of
    every step's."""

    def __init__(self, threshold):
        self.threshold, self.seen = threshold, []

    def __call__(self, input_ids, scores, **kwargs):
        scores = scores[-1] if isinstance(scores, tuple) else scores
        self.seen.append((input_ids[0, -1].item(), scores.clone()))
        return scores.max(dim=-1).values < self.threshold


def hf_greedy_with_scores(model, input_ids, max_new_tokens, criterion):
    return model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                          return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([criterion])).sequences


@pytest.mark.parametrize("engine", [False, True])
def test_stopping_criteria_get_the_scores_of_the_token_just_committed(llama, engine):
    """[1, V] float32, the logits that chose the last token (no logits processors here), on both runners."""
    input_ids = repetitive_prompt()
    hf = RecordScores(threshold=-1e9)
    free = hf_greedy_with_scores(llama, input_ids, 30, hf)
    # Stop at the last record low of greedy's top logit: the threshold lies between it and every earlier one.
    tops = [scores.max().item() for _, scores in hf.seen]
    stop = max(i for i in range(1, len(tops)) if tops[i] < min(tops[:i]))
    threshold = (tops[stop] + min(tops[:stop])) / 2
    expected_criterion, criterion = RecordScores(threshold), RecordScores(threshold)
    expected = hf_greedy_with_scores(llama, input_ids, 30, expected_criterion)
    config = ld.LookaheadConfig(4, 5, 4)
    runner = ld.StaticStep(llama, config, 64) if engine else None
    out = ld.generate(llama, input_ids, 30, config, stopping_criteria=StoppingCriteriaList([criterion]), runner=runner)
    assert out.sequences.tolist() == expected.tolist() and expected.shape[1] < free.shape[1]
    assert max(out.stats.accepted_histogram) > 1  # multi-token steps: scores taken along the accepted candidate
    assert [token for token, _ in criterion.seen] == [token for token, _ in expected_criterion.seen]
    for (token, scores), (_, reference) in zip(criterion.seen, expected_criterion.seen):
        assert scores.shape == (1, VOCAB) and scores.dtype == torch.float32
        assert scores.argmax().item() == token
        torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)


def test_streamer_gets_prompt_then_every_token_in_order(llama):
    input_ids = repetitive_prompt()
    streamer = Collector()
    out = ld.generate(llama, input_ids, 30, ld.LookaheadConfig(4, 4, 4), streamer=streamer)
    assert streamer.chunks[0] == input_ids[0].tolist()
    streamed = [token for chunk in streamer.chunks[1:] for token in chunk]
    assert streamed == out.sequences[0, input_ids.shape[1]:].tolist()
    assert streamer.ended
    assert out.stats.steps < 29  # several tokens per step, still streamed one by one


def test_stats_are_consistent(llama):
    out = ld.generate(llama, repetitive_prompt(), 33, ld.LookaheadConfig(3, 4, 3))
    stats = out.stats
    assert stats.new_tokens == 33
    assert stats.steps == sum(stats.accepted_histogram.values())
    assert stats.tokens_per_step == pytest.approx(33 / stats.steps)
    assert stats.seconds > 0 and stats.tokens_per_second == pytest.approx(33 / stats.seconds)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"window": 0}, ValueError, "LookaheadConfig.window must be >= 1, got 0"),
        ({"ngram": 1}, ValueError, "LookaheadConfig.ngram must be >= 2, got 1"),
        ({"guesses": -1}, ValueError, "LookaheadConfig.guesses must be >= 0, got -1"),
        ({"window": 2.5}, TypeError, "LookaheadConfig.window must be an integer, got 2.5 (float)"),
        ({"ngram": "5"}, TypeError, "LookaheadConfig.ngram must be an integer, got '5' (str)"),
        ({"guesses": True}, TypeError, "LookaheadConfig.guesses must be an integer, got True (bool)"),
        ({"candidate_length": 0}, ValueError, "LookaheadConfig.candidate_length must be >= 1, got 0"),
        ({"candidate_length": "3"}, TypeError, "LookaheadConfig.candidate_length must be an integer, got '3' (str)"),
    ],
)
def test_bad_config(kwargs, error, message):
    with pytest.raises(error) as info:
        ld.LookaheadConfig(**kwargs)
    assert str(info.value) == message


def test_empty_prompt(llama):
    with pytest.raises(ValueError, match="^the prompt is empty: input_ids has no tokens$"):
        ld.generate(llama, torch.zeros(1, 0, dtype=torch.long), 5)


def test_too_long(llama):
    with pytest.raises(ValueError) as info:
        ld.generate(llama, torch.zeros(1, 200, dtype=torch.long), 57)
    assert str(info.value) == (
        "prompt (200 tokens) + max_new_tokens (57) = 257 tokens exceeds the model's context length of 256"
    )


@pytest.mark.parametrize("input_ids, attention_mask, error, message", [
    (torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), ValueError,
     "row 1 of attention_mask is not left-padded (zeros after ones); lookahead decoding takes left-padded batches: "
     "set tokenizer.padding_side = 'left'"),
    (torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), ValueError,
     "prompt 1 is empty: it has no tokens"),
    (torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), ValueError,
     "attention_mask must have input_ids' shape (2, 4), got (2, 3)"),
    (torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 2), ValueError,
     "attention_mask must hold 0s and 1s only (row 0 does not)"),
    (torch.zeros(0, 4, dtype=torch.long), None, ValueError, "input_ids holds no prompt (batch size 0)"),
    ([[1, 2], []], None, ValueError, "prompt 1 is empty: it has no tokens"),
    ([[1, 2], [3, "4"]], None, TypeError, "prompt 1 must be a list of int token ids"),
    ([1, 2, 3], None, TypeError, "input_ids must be an integer torch.Tensor or numpy array of shape [batch, "
                                 "prompt_len] or a non-empty list of token-id lists, got list"),
    ([[1, 2], [3, VOCAB]], None, ValueError, "prompt 1 holds token ids outside the model's vocabulary [0, 96)"),
])
def test_bad_batches(llama, input_ids, attention_mask, error, message):
    with pytest.raises(error) as info:
        ld.generate(llama, input_ids, 5, ld.LookaheadConfig(2, 2, 2), attention_mask=attention_mask)
    assert str(info.value) == message


def test_a_batch_takes_source_names_not_one_source_object(llama):
    with pytest.raises(ValueError) as info:
        ld.generate(llama, [[1, 2], [3]], 5, ld.LookaheadConfig(2, 2, 2), source=ld.SuffixSource())
    assert str(info.value) == ("a CandidateSource object drafts for one sequence; for a batch of 2 prompts pass source "
                               "names (pool, suffix, recycled) or None")


def test_a_streamer_follows_one_sequence(llama):
    with pytest.raises(ValueError, match="^a streamer follows one sequence; got a batch of 2 prompts$"):
        ld.generate(llama, [[1, 2], [3]], 5, ld.LookaheadConfig(2, 2, 2), streamer=object())


def test_token_outside_vocabulary(llama):
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 96\)"):
        ld.generate(llama, torch.tensor([[1, VOCAB]]), 5)


def test_encoder_decoder_model_is_rejected():
    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(ld.UnsupportedModelError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        ld.generate(model, torch.tensor([[1, 2]]), 5)


@pytest.mark.parametrize("model, name", [("gpt2", "str"), (None, "NoneType"), (torch.nn.Linear(2, 2), "Linear")])
def test_what_is_not_a_model_is_rejected_by_name(model, name):
    with pytest.raises(ld.UnsupportedModelError, match=f"^{name} is not a transformers model"):
        ld.generate(model, torch.tensor([[1, 2]]), 5)


def test_a_model_in_training_mode_is_warned_about_and_left_as_it_is(llama):
    llama.train()
    try:
        with pytest.warns(UserWarning, match=r"^LlamaForCausalLM is in training mode \(dropout on\): call "
                                             r"model\.eval\(\) before generating$"):
            ld.generate(llama, torch.tensor([[1, 2]]), 2, ld.LookaheadConfig(2, 2, 2))
        assert llama.training
    finally:
        llama.eval()


def test_a_runner_that_is_not_a_step_runner_is_rejected(llama):
    with pytest.raises(TypeError, match="runner must be a step runner such as lookahead_decoding.StaticStep, got 5"):
        ld.generate(llama, torch.tensor([[1, 2]]), 5, runner=5)


def test_a_plan_is_checked_when_built_and_lists_make_the_same_plan():
    plain, wide = ld.LookaheadConfig(1, 2, 0), ld.LookaheadConfig(3, 4, 3)
    assert ld.StepPlan([plain, wide], [1.0, 2.0]) == ld.StepPlan((plain, wide), (1.0, 2.0))
    for shapes, costs, error, message in [
        ((), (), ValueError, "a plan needs one cost per shape, got 0 shapes and 0 costs"),
        ((plain, wide), (1.0,), ValueError, "a plan needs one cost per shape, got 2 shapes and 1 costs"),
        (("a",), (1.0,), TypeError, "a plan's shapes are LookaheadConfigs, got 'a'"),
        ((plain,), (float("nan"),), ValueError, r"step costs must be positive and finite \(ms\), got \[nan\]"),
        ((plain,), (-1.0,), ValueError, r"step costs must be positive and finite \(ms\), got \[-1.0\]"),
    ]:
        with pytest.raises(error, match=message):
            ld.StepPlan(shapes, costs)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"predictions": 10**6}, ValueError, "predictions .* must be an integer from 0 to the vocabulary's 96, got 1000000"),
    ({"predictions": -1}, ValueError, "predictions .* got -1"),
    ({"predictions": 2.5}, ValueError, "predictions .* got 2.5"),
    ({"compile": "yes"}, TypeError, "compile must be a bool, got 'yes'"),
    ({"pipeline": 1}, TypeError, "pipeline must be a bool or None, got 1"),
    ({"shapes": "x"}, TypeError, "a step runner's shapes are LookaheadConfigs, got 'x'"),
])
def test_static_engine_arguments_are_checked(llama, kwargs, error, message):
    arguments = {"shapes": ld.LookaheadConfig(3, 4, 3), "max_length": 64, **kwargs}
    with pytest.raises(error, match=message):
        ld.StaticStep(llama, **arguments)


def test_model_without_lm_head_is_rejected(llama):
    with pytest.raises(ld.UnsupportedModelError, match="LlamaModel has no language-modeling head"):
        ld.generate(llama.model, torch.tensor([[1, 2]]), 5)


def test_a_forward_without_explicit_positions_is_rejected(llama, monkeypatch):
    """Checked per forward function (the signature is inspected once per function): a model whose own forward
    drops position_ids is refused, while the class's forward still serves."""
    model = tiny_model("llama", seed=2)  # shared with later tests (cached): its own forward goes back afterwards
    monkeypatch.setattr(model, "forward", lambda input_ids, attention_mask=None, **kwargs: None, raising=False)
    with pytest.raises(ld.UnsupportedModelError, match=r"^LlamaForCausalLM\.forward takes no explicit "
                                                       r"position_ids/attention_mask, which lookahead decoding needs$"):
        ld.generate(model, torch.tensor([[1, 2]]), 5)
    assert ld.generate(llama, torch.tensor([[1, 2]]), 3).sequences.shape == (1, 5)


def test_attention_without_custom_masks_is_rejected():
    model = tiny_model("llama", seed=1)
    model.config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ld.UnsupportedModelError, match="attn_implementation='flash_attention_2'"):
            ld.generate(model, torch.tensor([[1, 2]]), 5)
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path does not exist: .*nowhere"):
        ld.load_model(tmp_path / "nowhere")


def test_broken_gguf(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="could not load a causal LM from .*broken.gguf"):
        ld.load_model(broken)


@pytest.mark.parametrize(
    "eos, error, message",
    [
        ("1205", TypeError, "eos_token_id must be an int, a list of ints or an integer tensor, got '1205' (str)"),
        ([2, "3"], TypeError, "eos_token_id must be an int, a list of ints or an integer tensor, got [2, '3'] (list)"),
        (2.0, TypeError, "eos_token_id must be an int, a list of ints or an integer tensor, got 2.0 (float)"),
        (True, TypeError, "eos_token_id must be an int, a list of ints or an integer tensor, got True (bool)"),
        (torch.tensor([2.0]), TypeError, "eos_token_id must be an int, a list of ints or an integer tensor, got "
                                         "tensor([2.]) (Tensor)"),
        (-1, ValueError, "eos_token_id must hold token ids >= 0, got -1"),
        ([2, 1000], ValueError, "eos_token_id [2, 1000] is outside the model's vocabulary [0, 96): such a token is "
                                "never generated"),
    ],
    ids=["str", "list-with-str", "float", "bool", "float-tensor", "negative", "outside-vocabulary"],
)
def test_bad_eos_token_id(llama, eos, error, message):
    with pytest.raises(error) as info:
        ld.generate(llama, repetitive_prompt(), 5, eos_token_id=eos)
    assert str(info.value) == message


@pytest.mark.parametrize("as_given", [int, lambda t: [t], lambda t: torch.tensor(t), lambda t: torch.tensor([t])],
                         ids=["int", "list", "0-dim-tensor", "tensor"])
def test_eos_token_id_forms_stop_where_greedy_stops(llama, as_given):
    input_ids = repetitive_prompt()
    free = greedy_reference(llama, input_ids, 30)
    eos = int(free[0, input_ids.shape[1] + 12])
    expected = greedy_reference(llama, input_ids, 30, eos_token_id=eos, pad_token_id=0)
    out = ld.generate(llama, input_ids, 30, ld.LookaheadConfig(4, 4, 4), eos_token_id=as_given(eos))
    assert out.sequences.tolist() == expected.tolist()
    assert out.sequences.shape[1] < free.shape[1]
