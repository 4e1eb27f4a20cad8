"""The embedded SmolLM2-135M-Instruct: identical to greedy on real text, and faster in steps on code."""

import pytest
import torch
from transformers import StoppingCriteriaList, StopStringCriteria, TextIteratorStreamer

import lookahead_decoding as ld

pytestmark = pytest.mark.slow

CHAT = [
    "What are three tips for staying productive when working from home?",
    "Explain the difference between a list and a tuple in Python.",
    "Write a short poem about autumn leaves.",
]
MATH = [
    "A shop sells pencils at 3 for $1. How much do 18 pencils cost? Explain step by step.",
    "Tom has 12 apples. He gives a third to Ann and half of the rest to Bob. How many apples does Tom keep?",
]
CODE = [
    'def fibonacci(n: int) -> list[int]:\n    """Return the first n Fibonacci numbers.\n    >>> fibonacci(5)\n    [0, 1, 1, 2, 3]\n    """\n',
    'def count_vowels(text: str) -> int:\n    """Count the vowels in text.\n    >>> count_vowels("hello")\n    2\n    """\n',
    'from typing import List\n\n\ndef running_max(values: List[int]) -> List[int]:\n    """Running maximum of a list.\n    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n    """\n',
]


@pytest.fixture(scope="module")
def default_model():
    return ld.load_default_model()


def encode(tokenizer, text, chat):
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("text, chat", [(t, True) for t in CHAT + MATH] + [(t, False) for t in CODE])
def test_identical_to_greedy(default_model, text, chat):
    model, tokenizer = default_model
    input_ids = encode(tokenizer, text, chat)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=64)
    out = ld.generate(model, input_ids, 64)  # config="auto": calibrated shapes, chosen per step
    assert out.sequences.tolist() == expected.tolist()
    if not chat:  # one fixed lookahead shape on every step: several tokens per step on code
        fixed = ld.generate(model, input_ids, 64, ld.LookaheadConfig())
        assert fixed.sequences.tolist() == expected.tolist()
        assert fixed.stats.tokens_per_step > 1.2, fixed.stats.as_dict()


def test_streamed_text_equals_final_text(default_model):
    model, tokenizer = default_model
    input_ids = encode(tokenizer, CHAT[1], chat=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = ld.generate(model, input_ids, 48, streamer=streamer)
    streamed = "".join(streamer)
    assert streamed == tokenizer.decode(out.sequences[0, input_ids.shape[1]:])


def test_stop_strings(default_model):
    model, tokenizer = default_model
    input_ids = encode(tokenizer, CODE[0], chat=False)
    free = tokenizer.decode(model.generate(input_ids, do_sample=False, max_new_tokens=64)[0, input_ids.shape[1]:])
    stop = "return"
    assert stop in free
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=64, stop_strings=[stop], tokenizer=tokenizer)
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, [stop])])
    out = ld.generate(model, input_ids, 64, stopping_criteria=criteria)
    assert out.sequences.tolist() == expected.tolist()
    new_tokens = out.sequences[0, input_ids.shape[1]:]
    assert stop in tokenizer.decode(new_tokens) and stop not in tokenizer.decode(new_tokens[:-1])
