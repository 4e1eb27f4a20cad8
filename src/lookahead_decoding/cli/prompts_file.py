"""The prompts file of `lookahead generate --prompts-file FILE --out RESULTS`: JSON Lines, read and checked in full
before any model is loaded (a bad line must not stop a long run halfway), and matched against the results already
written. No torch here.

A line's id defaults to the hash of what decides its result (its prompt, its max_new_tokens and --chat), so that a
rerun after lines were inserted, removed or edited runs exactly the prompts that have no result yet. Every result
carries that hash too: a line whose own id has a result of other content is refused, not skipped."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from ..jsonl import JsonLinesError, json_type, read_objects
from .common import check_prompt

LINE_KEYS = ("prompt", "id", "max_new_tokens")
INPUT_HASH_DIGITS = 16  # 64 bits: two different lines of one file as good as never share one


@dataclass(frozen=True)
class PromptLine:
    line: int  # 1-based line number in the prompts file, for error messages
    id: str | int
    prompt: str
    max_new_tokens: int
    input_hash: str  # input_hash(prompt, max_new_tokens, chat, sampling)


@dataclass(frozen=True)
class WrittenResult:
    line: int  # in the results file
    input_hash: str  # of the prompt line it is the result of


def input_hash(prompt: str, max_new_tokens: int, chat: bool, sampling: dict | None = None) -> str:
    """What decides the text a line gets (the model aside), hashed. `sampling`: the sampling options (None: plain
    greedy, hashed as before there were any)."""
    decisive = [prompt, max_new_tokens, chat] + ([] if sampling is None else [sampling])
    content = json.dumps(decisive, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:INPUT_HASH_DIGITS]


def read_prompts(path: str, max_new_tokens: int, chat: bool, sampling: dict | None = None) -> list[PromptLine]:
    """Every prompt of the file, checked; `max_new_tokens` is the default of a line without its own, `chat` whether
    the prompts go through the chat template, `sampling` the sampling options that decide the text (see
    `input_hash`)."""
    prompts, line_of_id, copies = [], {}, Counter()
    for number, entry in read_objects(path):
        if "prompt" not in entry:
            raise JsonLinesError(path, number, 'no "prompt" field')
        unknown = [key for key in entry if key not in LINE_KEYS]
        if unknown:  # a misspelt "max_new_tokens" must not run with the default instead
            raise JsonLinesError(path, number, f"unknown field {json.dumps(unknown[0], ensure_ascii=False)}; a line "
                                               f"has {', '.join(map(json.dumps, LINE_KEYS))}")
        prompt = entry["prompt"]
        if not isinstance(prompt, str):
            raise JsonLinesError(path, number, f'"prompt" must be a string, got a JSON {json_type(prompt)}')
        check_prompt(prompt, f"{path}:{number}: the prompt")
        limit = entry.get("max_new_tokens", max_new_tokens)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise JsonLinesError(path, number, f'"max_new_tokens" must be a positive integer, got {json.dumps(limit)}')
        hash_ = input_hash(prompt, limit, chat, sampling)
        if "id" in entry:
            id_ = checked_id(entry["id"], path, number)
        else:  # identical lines without an id: the second is HASH-2, and so on
            copies[hash_] += 1
            id_ = hash_ if copies[hash_] == 1 else f"{hash_}-{copies[hash_]}"
        if id_ in line_of_id:
            raise JsonLinesError(path, number, f"the id {json.dumps(id_, ensure_ascii=False)} is already used on line "
                                               f"{line_of_id[id_]}")
        line_of_id[id_] = number
        prompts.append(PromptLine(number, id_, prompt, limit, hash_))
    if not prompts:
        raise JsonLinesError(path, None, "no prompts in it")
    return prompts


def pending_prompts(path: str, prompts: list[PromptLine], out: str,
              written: Mapping[str | int, WrittenResult]) -> list[PromptLine]:
    """The prompts of the file at `path` that have no result in `out` yet. A prompt whose id has a result of another
    input hash is an error: the line changed since, and its result would be stale."""
    pending = []
    for entry in prompts:
        result = written.get(entry.id)
        if result is None:
            pending.append(entry)
        elif result.input_hash != entry.input_hash:
            raise JsonLinesError(path, entry.line, f"the result of id {json.dumps(entry.id, ensure_ascii=False)} in "
                                                   f"{out} (line {result.line}) is of another prompt, max_new_tokens, "
                                                   f"--chat or sampling options; give the line a new id, or remove that result from "
                                                   f"{out}")
    return pending


def checked_id(id_, path: str, line: int) -> str | int:
    """A line's "id", which must be a string or an integer."""
    if isinstance(id_, bool) or not isinstance(id_, (str, int)):
        raise JsonLinesError(path, line, f'"id" must be a string or an integer, got a JSON {json_type(id_)}')
    return id_
