"""The OpenAI API's request fields, checked; its response and stream-chunk shapes.

Every field a request carries is either used or refused with a 400 that names it: nothing is silently ignored.
Defaults follow the OpenAI API (temperature 1, top_p 1; completions stop after 16 tokens, chat at the server's
limit). Extensions: top_k, min_p, repetition_penalty, and `"lookahead": {"enabled": false}` for plain decoding
(`"draft_memory": false` in it: neither draft from earlier requests nor be remembered).
"""

from __future__ import annotations

import numbers
import random
import time
import uuid
from dataclasses import dataclass

from ..sampling_params import SEED_LIMIT, SamplingParams

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
                 "frequency_penalty", "stream", "stream_options", "top_k", "min_p", "repetition_penalty",
                 "lookahead", "user", "n"}
FIELDS = {"completion": COMMON_FIELDS | {"prompt"}, "chat": COMMON_FIELDS | {"messages", "max_completion_tokens"}}
UNSUPPORTED = {"logprobs", "top_logprobs", "best_of", "tools", "tool_choice", "functions", "function_call",
               "logit_bias", "response_format", "echo", "suffix", "parallel_tool_calls", "audio", "modalities",
               "prediction"}
MAX_STOP_STRINGS = 4
COMPLETION_DEFAULT_TOKENS = 16  # the OpenAI completions default


class APIError(Exception):
    """An error answered in the OpenAI shape, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int  # the most any request may ask for (and the chat default)
    vocab: int  # token ids a prompt given as ids may hold: [0, vocab)


@dataclass
class Generation:
    """A checked request: what to decode and how."""

    kind: str  # "completion" or "chat"
    model: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    lookahead: bool
    draft_memory: bool  # draft from the server's memory of earlier requests, and add this one to it
    id: str
    created: int


def _number(body: dict, name: str, default, low=None, high=None, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"'{name}' must be in [{low}, {high}], got {value!r}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    return stops


def _prompt_ids(kind: str, body: dict, tokenizer, vocab: int) -> list[int]:
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < vocab for t in prompt):
                raise APIError(400, f"'prompt' holds token ids outside the model's vocabulary [0, {vocab})", "prompt")
            return list(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string (or one list of token ids)", "prompt")
        return tokenizer(prompt).input_ids
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise APIError(400, f"messages[{index}] must have a string 'role' and a string 'content'", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    encoded = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                            add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def parse(kind: str, body, tokenizer, model_name: str, limits: Limits) -> Generation:
    """The Generation a request body asks for, or APIError naming what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in body:
        if name in UNSUPPORTED:
            raise APIError(400, f"'{name}' is not supported by this server", name)
        if name not in FIELDS[kind]:
            raise APIError(400, f"unknown field '{name}'", name)
    if body.get("n", 1) != 1:
        raise APIError(400, "'n' must be 1: this server returns one choice per request", "n")
    model = body.get("model")
    if model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       kind="not_found_error")
    prompt_ids = _prompt_ids(kind, body, tokenizer, limits.vocab)
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                            f"{limits.max_prompt_tokens}", "messages" if kind == "chat" else "prompt")
    name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    default = min(COMPLETION_DEFAULT_TOKENS, limits.max_new_tokens) if kind == "completion" else limits.max_new_tokens
    max_tokens = _number(body, name, default, 1, limits.max_new_tokens, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise APIError(400, "'stream_options' may only hold 'include_usage'", "stream_options")
    lookahead = body.get("lookahead") or {}
    if not isinstance(lookahead, dict) or set(lookahead) - {"enabled", "draft_memory"} or not all(
            isinstance(lookahead.get(key, True), bool) for key in ("enabled", "draft_memory")):
        raise APIError(400, "'lookahead' must be {\"enabled\": true or false, \"draft_memory\": true or false}",
                       "lookahead")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    seed = _number(body, "seed", None, 0, SEED_LIMIT - 1, integer=True)
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0, 2), top_k=_number(body, "top_k", 0, 0, integer=True),
            top_p=_number(body, "top_p", 1.0), min_p=_number(body, "min_p", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
            seed=random.getrandbits(63) if seed is None else seed)
    except ValueError as err:
        raise APIError(400, str(err), str(err).split(" ", 1)[0]) from None
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Generation(kind, model_name, prompt_ids, max_tokens, sampling, _stop(body), stream,
                      bool(stream_options.get("include_usage")), lookahead.get("enabled", True),
                      lookahead.get("draft_memory", True), f"{prefix}-{uuid.uuid4().hex}", int(time.time()))


def usage(generation: Generation, completion_tokens: int, stats) -> dict:
    steps = stats.steps if stats is not None else 0
    return {"prompt_tokens": len(generation.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(generation.prompt_ids) + completion_tokens,
            "lookahead": {"forwards": steps, "tokens_per_step": completion_tokens / max(steps, 1)}}


def _envelope(generation: Generation, chunk: bool) -> dict:
    if generation.kind == "chat":
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": generation.id, "object": kind, "created": generation.created, "model": generation.model}


def response(generation: Generation, text: str, finish_reason: str, usage_: dict) -> dict:
    """The whole answer of a request that does not stream."""
    if generation.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {**_envelope(generation, False), "choices": [choice], "usage": usage_}


def chunk(generation: Generation, text: str | None, finish_reason: str | None = None, first: bool = False,
          usage_: dict | None = None) -> dict:
    """One server-sent event of a streamed answer: new text, or the finish reason, or (choices empty) the usage."""
    if usage_ is not None:
        return {**_envelope(generation, True), "choices": [], "usage": usage_}
    if generation.kind == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {**_envelope(generation, True), "choices": [choice]}
