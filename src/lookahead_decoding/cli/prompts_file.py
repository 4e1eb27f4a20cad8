"""The JSON Lines files of `lookahead generate --prompts-file FILE --out RESULTS`: the prompts, read and checked in
full before any model is loaded (a bad line must not stop a long run halfway), and the results written so far,
whose ids a rerun skips. No torch here."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .common import CommandError, check_prompt

JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


@dataclass(frozen=True)
class PromptLine:
    line: int  # 1-based line number in the prompts file, for error messages
    id: str | int
    prompt: str
    max_new_tokens: int


@dataclass(frozen=True)
class WrittenResults:
    """The ids of the complete lines of a results file. Text after its last newline is a line cut short by an
    interrupted write: it is not counted, and is removed before results are appended."""

    path: str
    ids: frozenset
    complete_bytes: int
    size: int

    @property
    def has_cut_line(self) -> bool:
        return self.complete_bytes < self.size

    def drop_cut_line(self) -> None:
        if self.has_cut_line:
            os.truncate(self.path, self.complete_bytes)


def read_prompts(path: str, max_new_tokens: int) -> list[PromptLine]:
    """Every prompt of the file, checked; `max_new_tokens` is the default of a line without its own."""
    prompts, line_of_id = [], {}
    for number, entry in _json_objects(path, _read("--prompts-file", path)):
        where = f"{path}, line {number}"
        if "prompt" not in entry:
            raise CommandError(f'{where}: no "prompt" field')
        prompt = entry["prompt"]
        if not isinstance(prompt, str):
            raise CommandError(f'{where}: "prompt" must be a string, got a JSON {_json_type(prompt)}')
        check_prompt(prompt, f"{where}: the prompt")
        id_ = _checked_id(entry.get("id", number), where)
        if id_ in line_of_id:
            raise CommandError(f"{where}: the id {json.dumps(id_, ensure_ascii=False)} is already used on line "
                               f"{line_of_id[id_]}")
        line_of_id[id_] = number
        limit = entry.get("max_new_tokens", max_new_tokens)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise CommandError(f'{where}: "max_new_tokens" must be a positive integer, got {json.dumps(limit)}')
        prompts.append(PromptLine(number, id_, prompt, limit))
    if not prompts:
        raise CommandError(f"--prompts-file {path}: no prompts in it")
    return prompts


def read_results(path: str) -> WrittenResults:
    """The results already in `path` (none when it does not exist)."""
    if not os.path.exists(path):
        return WrittenResults(path, frozenset(), 0, 0)
    data = _read("--out", path)
    complete_bytes = data.rfind(b"\n") + 1
    ids = set()
    for number, entry in _json_objects(path, data[:complete_bytes]):
        where = f"{path}, line {number}"
        if "id" not in entry:
            raise CommandError(f'{where}: no "id" field: not a result line of --prompts-file (choose another --out)')
        ids.add(_checked_id(entry["id"], where))
    return WrittenResults(path, frozenset(ids), complete_bytes, len(data))


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as err:
        raise CommandError(f"{option} {path}: cannot read it ({err.strerror or err})") from None


def _json_objects(path: str, data: bytes) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every line that is not blank; any other line is an error that names it. Lines
    end at "\\n" only: JSON strings may hold other line separators such as U+2028."""
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
        where = f"{path}, line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError(f"{where}: not valid UTF-8 text") from None
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as err:
            raise CommandError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(entry, dict):
            raise CommandError(f"{where}: expected a JSON object, got a JSON {_json_type(entry)}")
        yield number, entry


def _checked_id(id_, where: str) -> str | int:
    if isinstance(id_, bool) or not isinstance(id_, (str, int)):
        raise CommandError(f'{where}: "id" must be a string or an integer, got a JSON {_json_type(id_)}')
    return id_


def _json_type(value) -> str:
    return JSON_TYPES[type(value)]
