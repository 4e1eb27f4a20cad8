"""`model.generate(custom_generate=ld.lookahead_generate)`: stop strings, options it refuses, dict outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference, tiny_model
from transformers import (AutoTokenizer, EosTokenCriteria, LlamaConfig, LlamaForCausalLM, MaxLengthCriteria,
                          MaxTimeCriteria, StoppingCriteriaList, StopStringCriteria)
from transformers.generation.utils import GenerateDecoderOnlyOutput

import lookahead_decoding as ld
from lookahead_decoding import hf_integration
from lookahead_decoding.decoding import decode

THROUGH = dict(custom_generate=ld.lookahead_generate, lookahead_config=ld.LookaheadConfig(4, 3, 4))


def prompt():
    return torch.tensor([[5, 6, 7, 8] * 4])


@pytest.fixture(scope="module")
def tokenized():
    """A 2-layer random Llama over the real SmolLM2 tokenizer, so that stop strings span real tokens."""
    gguf = ld.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return model, tokenizer


def test_stop_strings_through_stopping_criteria_stop_where_hf_stops(tokenized):
    model, tokenizer = tokenized
    input_ids = tokenizer("def add(a, b):\n    return a + b\n\ndef add(a, b):", return_tensors="pt").input_ids
    start = input_ids.shape[1]
    free = greedy_reference(model, input_ids, 40)
    # A stop string that ends inside a token, well before the end: the last characters of token 20 and the first
    # of token 21.
    before, after = (tokenizer.decode(free[0, start + i]) for i in (20, 21))
    text = tokenizer.decode(free[0, start:])
    stop = before[-2:] + after[:1]
    assert len(stop) == 3 and text.find(stop) >= len(tokenizer.decode(free[0, start:start + 18]))
    expected = greedy_reference(model, input_ids, 40, stop_strings=[stop], tokenizer=tokenizer)
    assert start < expected.shape[1] < free.shape[1]
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, [stop])])
    out = model.generate(input_ids, do_sample=False, max_new_tokens=40, stopping_criteria=criteria, **THROUGH)
    assert out.tolist() == expected.tolist()


def test_stop_strings_argument_says_how_to_stop_on_strings(llama):
    message = (r"^stop_strings: transformers does not pass `tokenizer` on to a custom_generate function, so the stop "
               r"strings cannot be matched; pass stopping_criteria=StoppingCriteriaList\(\[StopStringCriteria\("
               r"tokenizer, stop_strings\)\]\) instead, which stops at the same token$")
    with pytest.raises(ValueError, match=message):
        llama.generate(prompt(), max_new_tokens=5, stop_strings=["x"], tokenizer=object(), **THROUGH)


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(num_beams=2), "num_beams=2 (beam search)"),
        (dict(num_beams=2, num_beam_groups=2, diversity_penalty=0.5),
         "num_beams=2 (beam search), num_beam_groups=2 (group beam search)"),
        (dict(do_sample=True, num_return_sequences=2), "num_return_sequences=2 (several sequences per prompt)"),
        (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha=0.6 (contrastive search)"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3 (assisted generation)"),
        (dict(dola_layers="low"), "dola_layers='low' (DoLa decoding)"),
        (dict(return_dict_in_generate=True, output_scores=True), "output_scores=True (per-step scores)"),
        (dict(return_dict_in_generate=True, output_logits=True, output_hidden_states=True),
         "output_logits=True (per-step logits), output_hidden_states=True (hidden states)"),
        (dict(return_dict_in_generate=True, output_attentions=True), "output_attentions=True (attention weights)"),
    ],
    ids=["beams", "beam-groups", "return-sequences", "contrastive", "prompt-lookup", "dola", "scores",
         "logits-hidden", "attentions"],
)
def test_options_it_cannot_honour_are_refused_by_name(options, named):
    model = tiny_model("llama", attn_implementation="eager")  # eager: output_attentions needs it
    message = (f"model.generate(custom_generate=lookahead_generate) does not support {named}: lookahead decoding "
               "returns one sequence per prompt, greedy or sampled, and no scores")
    with pytest.raises(ValueError) as info:
        model.generate(prompt(), max_new_tokens=5, **options, **THROUGH)
    assert str(info.value) == message


def test_return_dict_in_generate_holds_the_greedy_sequences(llama):
    expected = greedy_reference(llama, prompt(), 20)
    out = llama.generate(prompt(), do_sample=False, max_new_tokens=20, return_dict_in_generate=True, **THROUGH)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.tolist() == expected.tolist()
    assert out.scores is None and out.logits is None


def test_neutral_values_of_those_options_are_accepted(llama):
    expected = greedy_reference(llama, prompt(), 12)
    out = llama.generate(prompt(), do_sample=False, max_new_tokens=12, num_beams=1, num_return_sequences=1,
                         output_scores=False, **THROUGH)
    assert out.tolist() == expected.tolist()


class CountingSuffixSource(ld.SuffixSource):
    proposals = 0

    def propose(self, history, max_length, budget):
        self.proposals += 1
        return super().propose(history, max_length, budget)


def test_the_draft_sources_can_be_chosen_through_generate(llama):
    input_ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    expected = greedy_reference(llama, input_ids, 24).tolist()
    counting = CountingSuffixSource()
    out = llama.generate(input_ids, do_sample=False, max_new_tokens=24, lookahead_source=counting, **THROUGH)
    assert out.tolist() == expected and counting.proposals > 0
    out = llama.generate(input_ids, do_sample=False, max_new_tokens=24, lookahead_source=["pool", "recycled"],
                         **THROUGH)
    assert out.tolist() == expected


def test_a_left_padded_batch_equals_hf_greedy_row_by_row(llama):
    """custom_generate takes a batch: each row stops on its own and comes back padded as model.generate pads it."""
    pad = 0
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 3], [11, 12, 13, 14]]
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = int(greedy_reference(llama, torch.tensor([prompts[1]]), 6)[0, len(prompts[1]) + 3])  # row 1 stops early
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=16, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    expected = llama.generate(input_ids, **kwargs)
    out = llama.generate(input_ids, custom_generate=ld.lookahead_generate, lookahead_config=ld.LookaheadConfig(3, 3, 2),
                         **kwargs)
    assert out.tolist() == expected.tolist()
    assert (out[1, width + 4:] == pad).all()  # stopped at its EOS, padded after it


def test_the_length_and_eos_criteria_transformers_adds_are_left_to_the_rows(llama, monkeypatch):
    """transformers always passes a MaxLengthCriteria and an EosTokenCriteria; the rows' budget and EOS ids apply
    them already, so only the caller's own criteria reach the rows (which check those after every token)."""
    handed_on = []

    def spy(*args, **kwargs):
        handed_on.append(kwargs["stopping_criteria"])
        return decode(*args, **kwargs)

    monkeypatch.setattr(hf_integration, "decode", spy)
    input_ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    free = greedy_reference(llama, input_ids, 24)
    eos = int(free[0, input_ids.shape[1] + 9])  # a token greedy decoding commits: it stops there
    expected = llama.generate(input_ids, do_sample=False, max_new_tokens=24, eos_token_id=eos)
    assert expected.shape[1] < free.shape[1]
    out = llama.generate(input_ids, do_sample=False, max_new_tokens=24, eos_token_id=eos, **THROUGH)
    assert out.tolist() == expected.tolist() and handed_on == [None]
    own = MaxLengthCriteria(input_ids.shape[1] + 5)  # tighter than the budget: the rows cannot apply it themselves
    out = llama.generate(input_ids, do_sample=False, max_new_tokens=24, stopping_criteria=StoppingCriteriaList([own]),
                         **THROUGH)
    assert out.tolist() == free[:, : input_ids.shape[1] + 5].tolist() and list(handed_on[1]) == [own]


def test_criteria_left_keeps_what_the_rows_do_not_apply():
    other_eos, time_limit = EosTokenCriteria([3, 9]), MaxTimeCriteria(60.0)
    given = [MaxLengthCriteria(30), EosTokenCriteria(torch.tensor(2)), other_eos, MaxLengthCriteria(12), time_limit]
    assert list(hf_integration.criteria_left(given, 30, {2, 3})) == [other_eos, given[3], time_limit]
    assert hf_integration.criteria_left(given[:2], 30, {2}) is None
    assert hf_integration.criteria_left(None, 30, set()) is None
