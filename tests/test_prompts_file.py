"""`lookahead generate --prompts-file FILE --out RESULTS [--batch-size B]`: every prompt of a JSON Lines file, B at
a time, each result appended as it finishes, resumable; on the tiny random Llama of the command-line tests."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import resource

import pytest
import torch
from conftest import CLI_MODEL_CONTEXT

from lookahead_decoding import decoding
from lookahead_decoding.cli import generate as generate_command
from lookahead_decoding.cli import main
from lookahead_decoding.cli.prompts_file import read_prompts

torch.set_num_threads(1)

SHAPE = ["--window", "3", "--ngram", "3"]  # one fixed step shape: no calibration, fast
MAX_NEW_TOKENS = 6
PROMPTS = [
    {"id": "sea", "prompt": "The sea is"},
    {"prompt": "Once upon a time", "max_new_tokens": 3},  # id: the hash of its content
    {"id": 7, "prompt": "Hi there"},
]
# Different lengths and limits, so that in a batch some finish before prompts above them.
BATCH_PROMPTS = [
    {"id": "long", "prompt": "The history of the city begins with a small village by the river"},
    {"id": "short", "prompt": "Yes", "max_new_tokens": 2},
    {"id": "mid", "prompt": "Once upon a time", "max_new_tokens": 4},
    {"id": 4, "prompt": "Hi there", "max_new_tokens": 1},
    {"id": "last", "prompt": "A list of fruits: apple,"},
]
RESULT_FIELDS = {"id", "prompt", "text", "new_tokens", "tokens_per_step", "seconds", "input_hash"}
HASH = re.compile("[0-9a-f]{16}")


def write_lines(path, *lines: str | dict) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def read_results(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_times(results: list[dict]) -> dict:
    """Results by id, without the one field that differs from run to run."""
    return {result["id"]: {name: value for name, value in result.items() if name != "seconds"} for result in results}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_file(capsys, model: str, prompts, out, *options: str) -> tuple[int, str, str]:
    return run(capsys, "--prompts-file", str(prompts), "--out", str(out), "--model", model,
               "--max-new-tokens", str(MAX_NEW_TOKENS), *SHAPE, *options)


def completed_run(capsys, model: str, prompts, out, lines: list, *options: str) -> list[dict]:
    """Writes `lines` as the prompts file, runs it to the end, and returns what --out then holds."""
    write_lines(prompts, *lines)
    code, _, err = run_file(capsys, model, prompts, out, *options)
    assert code == 0, err
    return read_results(out)


@pytest.fixture
def files(tmp_path):
    return tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"


@pytest.fixture
def lines_at_each_result(monkeypatch, files) -> list[int]:
    """One entry per result the scheduler hands back: how many lines --out held at that moment."""
    real_schedule, counts = decoding.schedule, []

    def counting_schedule(*args, **kwargs):
        scheduler = real_schedule(*args, **kwargs)
        real_run = scheduler.run

        def counting_run():
            for finished in real_run():
                counts.append(len(files[1].read_text().splitlines()))
                yield finished

        scheduler.run = counting_run
        return scheduler

    monkeypatch.setattr(decoding, "schedule", counting_schedule)
    return counts


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""
    def load_from_args(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate_command, "load_from_args", load_from_args)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_every_prompt_gets_the_text_of_a_single_generate(cli_model, files, capsys, chat):
    prompts, out = files
    write_lines(prompts, PROMPTS[0], "", PROMPTS[1], PROMPTS[2])  # the blank line is skipped, yet counted
    chat_option = ["--chat"] if chat else []
    # Without the draft memory each prompt also takes the steps of a single generate (test_draft_memory.py checks
    # that the memory leaves the text as it is).
    code, stdout, err = run_file(capsys, cli_model, prompts, out, *chat_option, "--draft-memory", "0")
    assert code == 0, err
    assert stdout == "" and "3/3" in err  # the progress bar, on stderr
    results = read_results(out)
    assert [result["id"] for result in results[::2]] == ["sea", 7]
    assert HASH.fullmatch(results[1]["id"]) and results[1]["id"] == results[1]["input_hash"]
    for result, entry in zip(results, PROMPTS):
        max_new_tokens = entry.get("max_new_tokens", MAX_NEW_TOKENS)
        code, single, err = run(capsys, entry["prompt"], "--model", cli_model, "--max-new-tokens", str(max_new_tokens),
                                *SHAPE, *chat_option, "--json")
        assert code == 0, err
        single = json.loads(single)
        assert set(result) == RESULT_FIELDS
        assert result["prompt"] == entry["prompt"]
        assert result["text"] == single["text"] and result["text"].strip()
        assert result["new_tokens"] == single["stats"]["new_tokens"] <= max_new_tokens
        assert result["tokens_per_step"] == single["stats"]["tokens_per_step"]
        assert result["seconds"] > 0


def test_a_rerun_skips_the_prompts_already_written(cli_model, files, capsys, lines_at_each_result):
    prompts, out = files
    (done_before,) = completed_run(capsys, cli_model, prompts, out, [PROMPTS[1]])
    write_lines(prompts, *PROMPTS)  # the prompt that ran is on line 2 now
    lines_at_each_result.clear()
    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    # Two prompts ran, and the first one's result was on disk before the second was handed back.
    assert lines_at_each_result == [1, 2]
    results = read_results(out)
    assert results[0] == done_before
    assert [result["id"] for result in results] == [done_before["id"], "sea", 7]

    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    assert lines_at_each_result == [1, 2]
    assert err == f"lookahead: all 3 prompts of {prompts} are in {out} already\n"
    assert read_results(out) == results


def test_a_last_line_cut_short_is_written_again(cli_model, files, capsys, lines_at_each_result):
    prompts, out = files
    complete = completed_run(capsys, cli_model, prompts, out, PROMPTS)
    first, second, _ = out.read_text().splitlines(keepends=True)
    out.write_text(first + second[:30])  # killed in the middle of writing the second result
    lines_at_each_result.clear()
    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    assert f"lookahead: {out}: its last line was cut short by an interrupted write; that prompt runs again\n" in err
    assert lines_at_each_result == [1, 2]
    results = read_results(out)
    assert results[0] == complete[0]
    assert [result["id"] for result in results] == [result["id"] for result in complete]
    assert without_times(results) == without_times(complete)


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_a_prompt_the_model_cannot_take_names_its_line_before_any_decoding(cli_model, files, capsys,
                                                                           lines_at_each_result, batch_size):
    prompts, out = files
    write_lines(prompts, PROMPTS[0], {"prompt": "word " * CLI_MODEL_CONTEXT}, PROMPTS[2])
    code, _, err = run_file(capsys, cli_model, prompts, out, "--batch-size", batch_size)
    assert code == 2
    assert err.startswith(f"lookahead: error: {prompts}:2: prompt (")
    assert err.endswith(f"exceeds the model's context length of {CLI_MODEL_CONTEXT}\n")
    assert lines_at_each_result == [] and not out.exists()


def test_a_batch_writes_each_prompt_what_one_at_a_time_writes(cli_model, tmp_path, files, capsys,
                                                             lines_at_each_result):
    prompts, out = files
    write_lines(prompts, *BATCH_PROMPTS)
    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    one_at_a_time = out.rename(tmp_path / "one-at-a-time.jsonl")
    lines_at_each_result.clear()
    code, stdout, err = run_file(capsys, cli_model, prompts, out, "--batch-size", "3")
    assert code == 0, err
    assert stdout == "" and "5/5" in err
    # Each result was on disk before the next one was handed back.
    assert lines_at_each_result == [0, 1, 2, 3, 4]
    batched = read_results(out)
    ids = [entry["id"] for entry in BATCH_PROMPTS]
    assert [result["id"] for result in read_results(one_at_a_time)] == ids
    assert sorted(map(str, (result["id"] for result in batched))) == sorted(map(str, ids))
    assert [result["id"] for result in batched] != ids  # the short prompts finished first
    expected = {result["id"]: result for result in read_results(one_at_a_time)}
    limits = {entry["id"]: entry.get("max_new_tokens", MAX_NEW_TOKENS) for entry in BATCH_PROMPTS}
    for result in batched:
        assert set(result) == RESULT_FIELDS
        single = expected[result["id"]]
        assert (result["prompt"], result["text"], result["new_tokens"]) == (
            single["prompt"], single["text"], single["new_tokens"])
        assert result["new_tokens"] == limits[result["id"]]  # each stops at its own limit (no EOS here)


def test_a_batched_rerun_skips_the_ids_written_in_any_order(cli_model, files, capsys, lines_at_each_result):
    prompts, out = files
    complete = completed_run(capsys, cli_model, prompts, out, BATCH_PROMPTS, "--batch-size", "3")
    done_before = [result for result in complete if result["id"] in ("last", 4)]
    write_lines(out, *done_before)
    lines_at_each_result.clear()
    code, _, err = run_file(capsys, cli_model, prompts, out, "--batch-size", "3")
    assert code == 0, err
    assert lines_at_each_result == [2, 3, 4]
    results = read_results(out)
    assert results[:2] == done_before
    assert sorted(map(str, (result["id"] for result in results[2:]))) == ["long", "mid", "short"]
    assert without_times(results) == without_times(complete)

    code, _, err = run_file(capsys, cli_model, prompts, out, "--batch-size", "3")
    assert code == 0, err
    assert lines_at_each_result == [2, 3, 4]
    assert err == f"lookahead: all 5 prompts of {prompts} are in {out} already\n"
    assert read_results(out) == results


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompts-file", "prompts.jsonl", "--out", "out.jsonl", "--batch-size", "0"],
         "lookahead generate: error: argument --batch-size: must be a positive integer, got 0\n"),
        (["--prompts-file", "prompts.jsonl", "--out", "out.jsonl", "--batch-size", "two"],
         "lookahead generate: error: argument --batch-size: expected a positive integer, got 'two'\n"),
        (["a prompt", "--batch-size", "2"],
         "lookahead: error: --batch-size goes with --prompts-file; a single prompt is decoded alone\n"),
    ],
    ids=["zero", "not-a-number", "single-prompt"],
)
def test_batch_size_errors(capsys, no_model, argv, message):
    code, stdout, err = run(capsys, *argv)
    assert (code, stdout) == (2, "")
    assert err.endswith(message)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', '{"prompt": "b"'], "2: not valid JSON (Expecting ',' delimiter at column 15)"),
        (['["a prompt"]'], "1: expected a JSON object, got a JSON array"),
        (['{"prompt": "a"}', '{"text": "b"}'], '2: no "prompt" field'),
        (['{"prompt": 3}'], '1: "prompt" must be a string, got a JSON number'),
        (['{"prompt": "a"}', "", '{"prompt": " \\n "}'], "3: the prompt is empty"),
        (['{"prompt": "\\ud800"}'], "1: the prompt is not valid UTF-8 text: undecodable character '\\ud800' at "
                                    "position 0 (was it written in another encoding?)"),
        (['{"prompt": "a", "id": "x"}', '{"prompt": "b"}', '{"prompt": "c", "id": "x"}'],
         '3: the id "x" is already used on line 1'),
        (['{"prompt": "a", "id": 1.5}'], '1: "id" must be a string or an integer, got a JSON number'),
        (['{"prompt": "a", "max_new_tokens": 0}'], '1: "max_new_tokens" must be a positive integer, got 0'),
        (['{"prompt": "a"}', '{"prompt": "b", "max_new_token": 50}'],
         '2: unknown field "max_new_token"; a line has "prompt", "id", "max_new_tokens"'),
    ],
    ids=["invalid-json", "not-an-object", "no-prompt", "number-prompt", "empty-prompt", "lone-surrogate",
         "duplicate-id", "float-id", "zero-max-new-tokens", "misspelt-field"],
)
def test_a_bad_line_is_named_before_the_model_loads(files, capsys, no_model, lines, message):
    prompts, out = files
    write_lines(prompts, *lines)
    code, stdout, err = run_file(capsys, "unused", prompts, out)
    assert (code, stdout) == (2, "")
    assert err == f"lookahead: error: {prompts}:{message}\n"
    assert not out.exists()


def test_bytes_that_are_not_utf8_name_their_line(files, capsys, no_model):
    prompts, out = files
    prompts.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    code, _, err = run_file(capsys, "unused", prompts, out)
    assert code == 2 and err == (f"lookahead: error: {prompts}:2: not valid UTF-8 (byte 0xe9 at column 16; was it "
                                 "saved in another encoding?)\n")


@pytest.mark.parametrize(
    "prompts_text, results_text, options, message",
    [
        ("", None, [], "{prompts}: no prompts in it"),
        ("", None, ["--batch-size", "3"], "{prompts}: no prompts in it"),
        ("\n  \n", None, [], "{prompts}: no prompts in it"),
        (None, None, [], "{prompts}: cannot read it (No such file or directory)"),
        ('{"prompt": "a"}\n', '{"text": "b"}\n', [],
         '{out}:1: no "id" field: not a result line of --prompts-file (choose another --out)'),
        ('{"prompt": "a"}\n', '{"id": "b", "text": "c"}\n', [],
         '{out}:1: no "input_hash" field: not a result line of --prompts-file (choose another --out)'),
        ('{"prompt": "a"}\n', "my notes, no newline at the end", [],
         "{out}:1: not a result line of --prompts-file, and not the start of one cut short (choose another --out)"),
        ('{"prompt": "a"}\n', None, ["--compare"], "--compare works on a single prompt, not with --prompts-file"),
        ('{"prompt": "a"}\n', None, ["--json"], "--json works on a single prompt, not with --prompts-file"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', None, ["--batch-size", "3"],
         "{prompts}:2: not valid JSON (Expecting ',' delimiter at column 15)"),
    ],
    ids=["empty", "empty-batch", "blank-lines", "missing", "foreign-results", "results-without-hash",
         "foreign-text-without-newline", "compare", "json", "bad-line-batch"],
)
def test_file_errors_are_one_line_before_the_model_loads(files, capsys, no_model, prompts_text, results_text,
                                                         options, message):
    prompts, out = files
    if prompts_text is not None:
        prompts.write_text(prompts_text)
    if results_text is not None:
        out.write_text(results_text)
    code, stdout, err = run_file(capsys, "unused", prompts, out, *options)
    assert (code, stdout) == (2, "")
    assert err == f"lookahead: error: {message.format(prompts=prompts, out=out)}\n"
    if results_text is not None:
        assert out.read_text() == results_text  # left as it was


def test_out_is_checked_before_the_model_loads(files, tmp_path, capsys, no_model):
    prompts, _ = files
    write_lines(prompts, *PROMPTS)
    missing_folder = tmp_path / "no-such-folder" / "results.jsonl"
    code, _, err = run_file(capsys, "unused", prompts, missing_folder)
    assert code == 2
    assert err == f"lookahead: error: --out {missing_folder}: the folder {missing_folder.parent} does not exist\n"
    code, _, err = run(capsys, "--prompts-file", str(prompts), "--model", "unused")
    assert code == 2
    assert err == "lookahead: error: --prompts-file needs --out RESULTS.jsonl, the file the results are written to\n"


def test_a_prompt_and_a_prompts_file_together_are_a_usage_error(files, capsys, no_model):
    prompts, out = files
    write_lines(prompts, *PROMPTS)
    code, stdout, err = run(capsys, "a prompt", "--prompts-file", str(prompts), "--out", str(out))
    assert (code, stdout) == (2, "")
    assert err.startswith("usage: lookahead generate")
    assert "error: argument --prompts-file: not allowed with argument prompt" in err
    code, _, err = run(capsys, "a prompt", "--out", str(out))
    assert code == 2
    assert err == "lookahead: error: --out goes with --prompts-file; a single prompt's result is printed\n"


def test_a_gzip_prompts_file_is_read_whatever_its_name(cli_model, tmp_path, files, capsys):
    prompts, out = files
    gzipped = tmp_path / "prompts.jsonl.gz"
    gzipped.write_bytes(gzip.compress(json.dumps(PROMPTS[0]).encode() + b"\n"))
    code, _, err = run_file(capsys, cli_model, gzipped, out)
    assert code == 0, err
    assert [result["id"] for result in read_results(out)] == ["sea"]
    gzipped.write_bytes(gzip.compress(b'{"prompt": "a"}\n{"text": "b"}\n'))
    code, _, err = run_file(capsys, cli_model, gzipped, out)
    assert (code, err) == (2, f'lookahead: error: {gzipped}:2: no "prompt" field\n')


def test_an_inserted_line_runs_alone_and_an_edited_one_runs_again(cli_model, files, capsys, lines_at_each_result):
    prompts, out = files
    first_run = completed_run(capsys, cli_model, prompts, out, PROMPTS)
    # A new line where the line without an id was: only the new prompt runs.
    results = completed_run(capsys, cli_model, prompts, out, [PROMPTS[0], {"prompt": "A new prompt"}, *PROMPTS[1:]])
    assert results[:3] == first_run
    assert [result["prompt"] for result in results[3:]] == ["A new prompt"]
    # The line without an id edited: its new prompt runs; the result of the old one stays as it was.
    edited = {**PROMPTS[1], "prompt": "Once upon a time, far away"}
    after_edit = completed_run(capsys, cli_model, prompts, out, [PROMPTS[0], {"prompt": "A new prompt"}, edited,
                                                                PROMPTS[2]])
    assert after_edit[:4] == results
    assert [result["prompt"] for result in after_edit[4:]] == [edited["prompt"]]
    assert lines_at_each_result == [0, 1, 2, 3, 4]


def test_a_changed_line_whose_id_has_a_result_is_refused(cli_model, files, capsys):
    prompts, out = files
    completed_run(capsys, cli_model, prompts, out, [{"prompt": "x", "id": 0}, PROMPTS[0]])
    written = out.read_text()
    # (the second line, options, where the first refused line is, its id)
    changed = [({**PROMPTS[0], "prompt": "The sea was"}, [], 2, '"sea"'),
               ({**PROMPTS[0], "max_new_tokens": 2}, [], 2, '"sea"'),
               (PROMPTS[0], ["--chat"], 1, "0"),  # --chat changes every line
               (PROMPTS[0], ["--temperature", "0.8"], 1, "0"),  # so do the sampling options
               (PROMPTS[0], ["--repetition-penalty", "1.2"], 1, "0")]
    for line, options, refused, id_ in changed:
        write_lines(prompts, {"prompt": "x", "id": 0}, line)
        code, stdout, err = run_file(capsys, cli_model, prompts, out, *options)
        assert (code, stdout) == (2, "")  # before the model loads: a run that loaded it would go on
        assert err == (f"lookahead: error: {prompts}:{refused}: the result of id {id_} in {out} (line {refused}) is "
                       f"of another prompt, max_new_tokens, --chat or sampling options; give the line a new id, or remove that "
                       f"result from {out}\n")
        assert out.read_text() == written


def test_identical_lines_without_an_id_each_get_one(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_lines(prompts, {"prompt": "a"}, {"prompt": "a", "id": "x"}, {"prompt": "a"}, {"prompt": "a"})
    ids = [entry.id for entry in read_prompts(str(prompts), MAX_NEW_TOKENS, chat=False)]
    assert HASH.fullmatch(ids[0]) and ids[1:] == ["x", f"{ids[0]}-2", f"{ids[0]}-3"]


def test_a_second_run_on_the_same_out_fails_at_once(files, capsys, no_model):
    prompts, out = files
    write_lines(prompts, *PROMPTS)
    out.write_text("")
    with open(out, "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX)
        code, stdout, err = run_file(capsys, "unused", prompts, out)
    assert (code, stdout) == (1, "")
    assert err == (f"lookahead: error: --out {out}: another run is writing to it; wait for it to end, or choose "
                   "another --out\n")
    assert out.read_text() == ""


def test_the_lock_is_held_while_results_are_written(cli_model, files, capsys, monkeypatch):
    prompts, out = files
    write_lines(prompts, *PROMPTS)
    real_schedule, locked = decoding.schedule, []

    def schedule_trying_the_lock(*args, **kwargs):
        with open(out, "a") as other_run:
            try:
                fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                locked.append(True)
        return real_schedule(*args, **kwargs)

    monkeypatch.setattr(decoding, "schedule", schedule_trying_the_lock)
    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    assert locked == [True] and len(read_results(out)) == 3


@pytest.mark.parametrize("kind", ["pipe", "/dev/zero", "/dev/full"])
def test_out_that_is_not_a_regular_file_is_refused_before_the_model_loads(files, capsys, no_model, kind):
    prompts, out = files
    write_lines(prompts, *PROMPTS)
    if kind == "pipe":  # what `--out /dev/stdout` is when stdout goes into a pipe
        os.mkfifo(out)
    else:
        out = kind
    code, stdout, err = run_file(capsys, "unused", prompts, out)
    assert (code, stdout) == (1, "")
    what = "a pipe" if kind == "pipe" else "a character device"
    assert err == (f"lookahead: error: --out {out}: is {what}, not a regular file; the results go to a file that a "
                   "rerun can read back\n")


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_what_was_written(cli_model, files, capsys):
    prompts, out = files
    complete = completed_run(capsys, cli_model, prompts, out, PROMPTS)
    out.unlink()
    first_line = len(json.dumps(complete[0], ensure_ascii=False)) + 1
    # No file may grow past the first result and a part of the second: as on a disk that fills up then.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (first_line + 20, hard))
    try:
        code, stdout, err = run_file(capsys, cli_model, prompts, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (code, stdout) == (1, "")
    assert err.endswith(f"lookahead: error: --out {out}: cannot write to it (File too large); the results written "
                        "so far are kept: make room, and run the same command again to go on\n")
    assert err.count("lookahead:") == 1
    kept, cut = out.read_text().split("\n")
    assert without_times([json.loads(kept)]) == without_times(complete[:1]) and 0 < len(cut) < 40
    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    assert "its last line was cut short by an interrupted write; that prompt runs again" in err
    assert without_times(read_results(out)) == without_times(complete)
