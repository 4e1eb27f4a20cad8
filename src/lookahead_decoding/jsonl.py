"""JSON Lines files, one JSON object a line: the benchmark data files, and the prompts and results files of
`lookahead generate --prompts-file`. One reader for all of them, with one error, JsonLinesError, whose message
names the file and the line: `FILE:LINE: problem`.

Lines end at "\\n" only: JSON strings may hold other line separators such as U+2028. Blank lines are skipped, yet
counted. A UTF-8 byte order mark at the start of the file is skipped. A gzip'd file is told by its first bytes,
whatever its name, and decompressed as it is read.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


class JsonLinesError(ValueError):
    """A JSON Lines file that cannot be read, or a line of it that its reader cannot take."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        """`line` is None for a problem of the file as a whole."""
        super().__init__(f"{path}: {problem}" if line is None else f"{path}:{line}: {problem}")


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return JSON_TYPES[type(value)]


def read_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of the file at `path`, read as it goes: a caller that stops
    early reads, and checks, no further."""
    try:
        file = open(path, "rb")
    except OSError as err:
        raise JsonLinesError(path, None, f"cannot read it ({err.strerror or err})") from None
    with file:
        if file.peek(len(GZIP_MAGIC)).startswith(GZIP_MAGIC):
            yield from parse_objects(path, gzip.GzipFile(fileobj=file), "cannot decompress it as gzip")
        else:
            yield from parse_objects(path, file)


def parse_objects(path: str | Path, lines: Iterable[bytes], unreadable: str = "cannot read it") -> Iterator[
        tuple[int, dict]]:
    """(line number, object) of every non-blank line of `lines`, the byte lines of the file at `path` from its
    first; `unreadable` is the problem when the next line cannot be had."""
    lines = iter(lines)
    for number in itertools.count(1):
        try:
            raw = next(lines, None)
        except (OSError, EOFError, zlib.error) as err:  # a corrupt or truncated gzip stream, a failing disk
            raise JsonLinesError(path, number, f"{unreadable} ({err})") from None
        if raw is None:
            return
        raw = raw.removesuffix(b"\n")  # so that a JSON error's column is on this line
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise JsonLinesError(path, number, f"not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                                               f"{err.start + 1}; was it saved in another encoding?)") from None
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as err:
            raise JsonLinesError(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(entry, dict):
            raise JsonLinesError(path, number, f"expected a JSON object, got a JSON {json_type(entry)}")
        yield number, entry
