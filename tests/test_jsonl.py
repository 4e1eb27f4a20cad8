"""The one JSON Lines reader of the package (benchmark data files, prompts files, results files): what it reads, and
its one error, `FILE:LINE: problem`."""

from __future__ import annotations

import codecs
import gzip

import pytest

from lookahead_decoding.jsonl import JsonLinesError, parse_objects, read_objects

LINES = b'{"a": 1}\n\n  \r\n{"b": "x\xe2\x80\xa8y"}\r\n{"c": [2]}'  # blank lines; U+2028 inside a string
OBJECTS = [(1, {"a": 1}), (4, {"b": "x\u2028y"}), (5, {"c": [2]})]


def read(path) -> list[tuple[int, dict]]:
    return list(read_objects(path))


def problem(path, data: bytes) -> str:
    path.write_bytes(data)
    with pytest.raises(JsonLinesError) as info:
        read(path)
    return str(info.value)


def test_blank_lines_are_skipped_but_counted_and_lines_end_at_newline_only(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(LINES)
    assert read(path) == OBJECTS


def test_a_byte_order_mark_at_the_start_is_skipped(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + LINES)
    assert read(path) == OBJECTS


@pytest.mark.parametrize("name", ["f.jsonl.gz", "f.jsonl"], ids=["gz-name", "plain-name"])
def test_gzip_is_read_by_its_content_whatever_the_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(codecs.BOM_UTF8 + LINES))
    assert read(path) == OBJECTS


def test_the_file_is_read_as_it_goes(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a": 1}\n{broken\n')
    objects = read_objects(path)
    assert next(objects) == (1, {"a": 1})  # a caller that stops here never meets line 2


@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"a": 1}\n{"b": "caf\xe9"}\n', "2: not valid UTF-8 (byte 0xe9 at column 11; was it saved in another "
                                          "encoding?)"),
        (b'{"a": 1}\n\n{"b": 2\n', "3: not valid JSON (Expecting ',' delimiter at column 8)"),
        (b'{"a": 1}\n["a"]\n', "2: expected a JSON object, got a JSON array"),
        (b'"text"\n', "1: expected a JSON object, got a JSON string"),
        (b"null\n", "1: expected a JSON object, got a JSON null"),
    ],
    ids=["bad-utf8", "bad-json", "array", "string", "null"],
)
def test_a_bad_line_is_named_by_file_and_line(tmp_path, data, message):
    path = tmp_path / "f.jsonl"
    assert problem(path, data) == f"{path}:{message}"
    gzipped = tmp_path / "f.jsonl.gz"
    assert problem(gzipped, gzip.compress(data)) == f"{gzipped}:{message}"


def test_a_truncated_gzip_file_names_the_line_it_breaks_on(tmp_path):
    data = gzip.compress(b"".join(b'{"prompt": "p%d"}\n' % i for i in range(2000)))
    path = tmp_path / "f.jsonl.gz"
    message = problem(path, data[: len(data) // 2])
    line = int(message.removeprefix(f"{path}:").partition(":")[0])
    assert 1 < line < 2000
    assert message == (f"{path}:{line}: cannot decompress it as gzip (Compressed file ended before the "
                       "end-of-stream marker was reached)")


def test_gzip_magic_on_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "f.jsonl"
    assert problem(path, b"\x1f\x8bnot gzip at all\n") == (
        f"{path}:1: cannot decompress it as gzip (Unknown compression method)")


def test_a_file_that_cannot_be_opened(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(JsonLinesError) as info:
        read(missing)
    assert str(info.value) == f"{missing}: cannot read it (No such file or directory)"
    with pytest.raises(JsonLinesError) as info:
        read(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read it (Is a directory)"


def test_the_error_is_a_value_error_naming_the_file_and_line():
    error = JsonLinesError("f.jsonl", 3, "no prompt")
    assert isinstance(error, ValueError) and str(error) == "f.jsonl:3: no prompt"
    assert str(JsonLinesError("f.jsonl", None, "empty")) == "f.jsonl: empty"


def test_lines_already_in_memory_parse_the_same():
    assert list(parse_objects("f.jsonl", (codecs.BOM_UTF8 + LINES).split(b"\n"))) == OBJECTS
    with pytest.raises(JsonLinesError, match=r"^f\.jsonl:2: expected a JSON object, got a JSON number$"):
        list(parse_objects("f.jsonl", [b"{}", b"3"]))
