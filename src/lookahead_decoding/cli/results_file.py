"""The --out file of `lookahead generate --prompts-file`: the results written so far, which a rerun skips, and the
file each new result is appended to as it finishes. No torch here.

The file is locked for the whole run, so that a second run on it fails at once instead of writing every result
again. It must be a regular file: a rerun reads it back to resume, which a pipe or a device cannot give. A result
is written as one whole line with nothing left in a buffer, so that a failed write (a full disk) ends the run with
one line and leaves at most a line cut short, which the next run removes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterable, Iterator

from ..jsonl import JsonLinesError, parse_objects
from .common import RunError, check_writable
from .prompts_file import WrittenResult, checked_id

SPECIAL_FILES = ((stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISSOCK, "a socket"))
RESULT_KEYS = ("id", "input_hash")  # what a rerun reads back
LINE_START = b'{"id": '  # how every result line starts (`append` writes the id first)


class ResultsFile:
    """--out, open for appending. `written` maps the id of every complete line to its WrittenResult. Text after the
    last newline that starts as a result line does is a line cut short by an interrupted write: it is not counted,
    and drop_cut_line removes it. Any other text there is not ours, and the file is refused (removing it would lose
    it)."""

    def __init__(self, path: str, file):
        self.path = path
        self._file = file
        file.seek(0)
        data = file.read()
        self._complete_bytes = data.rfind(b"\n") + 1
        self.has_cut_line = self._complete_bytes < len(data)
        lines = data[:self._complete_bytes].split(b"\n")
        self.written = _written(path, lines)
        cut = data[self._complete_bytes:]
        if self.has_cut_line and not (cut.startswith(LINE_START) or LINE_START.startswith(cut)):
            raise JsonLinesError(path, len(lines), "not a result line of --prompts-file, and not the start of one "
                                                   "cut short (choose another --out)")

    def drop_cut_line(self) -> None:
        self._file.truncate(self._complete_bytes)

    def append(self, result: dict) -> None:
        """Writes `result` as one JSON line."""
        line = memoryview((json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            while line:  # a write may take only a part
                line = line[self._file.write(line):]
        except OSError as err:
            raise RunError(f"--out {self.path}: cannot write to it ({err.strerror or err}); the results written so "
                           "far are kept: make room, and run the same command again to go on") from None


@contextlib.contextmanager
def open_results(path: str) -> Iterator[ResultsFile]:
    """--out, locked until the block ends; refused at once when it is not a regular file or another run holds it.
    A file this call creates is removed again when nothing was written to it."""
    _refuse_special_file(path)
    check_writable("--out", path)
    created = not os.path.exists(path)
    with open(path, "ab+", buffering=0) as file:
        _lock(path, file)
        try:
            yield ResultsFile(path, file)
        finally:
            if created and os.fstat(file.fileno()).st_size == 0:
                os.remove(path)  # while locked: a run that opened it in the meantime sees that in _lock


def _refuse_special_file(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there (it is created), or not reachable (check_writable says why)
        return
    for is_kind, kind in SPECIAL_FILES:
        if is_kind(mode):
            raise RunError(f"--out {path}: is {kind}, not a regular file; the results go to a file that a rerun can "
                           "read back")


def _lock(path: str, file) -> None:
    """Takes the lock of --out, or fails at once when another run holds it."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The run that held the lock may have removed the file (it wrote nothing) after this one opened it.
        held_by_another = not os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except (BlockingIOError, FileNotFoundError):
        held_by_another = True
    if held_by_another:
        raise RunError(f"--out {path}: another run is writing to it; wait for it to end, or choose another --out")


def _written(path: str, lines: Iterable[bytes]) -> dict[str | int, WrittenResult]:
    written = {}
    for number, entry in parse_objects(path, lines):
        missing = [key for key in RESULT_KEYS if key not in entry]
        if missing:
            raise JsonLinesError(path, number, f'no "{missing[0]}" field: not a result line of --prompts-file '
                                               "(choose another --out)")
        written[checked_id(entry["id"], path, number)] = WrittenResult(number, entry["input_hash"])
    return written
