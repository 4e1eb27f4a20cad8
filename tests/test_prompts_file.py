"""`lookahead generate --prompts-file FILE --out RESULTS [--batch-size B]`: every prompt of a JSON Lines file, B at
a time, each result appended as it finishes, resumable; on the tiny random Llama of the command-line tests."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLI_MODEL_CONTEXT

from lookahead_decoding import decoding
from lookahead_decoding.cli import generate as generate_command
from lookahead_decoding.cli import main

torch.set_num_threads(1)

SHAPE = ["--window", "3", "--ngram", "3"]  # one fixed step shape: no calibration, fast
MAX_NEW_TOKENS = 6
PROMPTS = [
    {"id": "sea", "prompt": "The sea is"},
    {"prompt": "Once upon a time", "max_new_tokens": 3},  # id: its line number
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
RESULT_FIELDS = {"id", "prompt", "text", "new_tokens", "tokens_per_step", "seconds"}


def write_lines(path, *lines: str | dict) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def read_results(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_file(capsys, model: str, prompts, out, *options: str) -> tuple[int, str, str]:
    return run(capsys, "--prompts-file", str(prompts), "--out", str(out), "--model", model,
               "--max-new-tokens", str(MAX_NEW_TOKENS), *SHAPE, *options)


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
    code, stdout, err = run_file(capsys, cli_model, prompts, out, *chat_option)
    assert code == 0, err
    assert stdout == "" and "3/3" in err  # the progress bar, on stderr
    results = read_results(out)
    assert [result["id"] for result in results] == ["sea", 3, 7]
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


def test_a_rerun_skips_the_ids_already_written(cli_model, files, capsys, lines_at_each_result):
    prompts, out = files
    write_lines(prompts, *PROMPTS)
    done_before = {"id": 2, "prompt": PROMPTS[1]["prompt"], "text": "from an earlier run", "new_tokens": 3,
                   "tokens_per_step": 1.0, "seconds": 0.5}
    write_lines(out, done_before)
    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    # Two prompts ran, and the first one's result was on disk before the second was handed back.
    assert lines_at_each_result == [1, 2]
    results = read_results(out)
    assert results[0] == done_before
    assert [result["id"] for result in results] == [2, "sea", 7]

    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    assert lines_at_each_result == [1, 2]
    assert err == f"lookahead: all 3 prompts of {prompts} are in {out} already\n"
    assert read_results(out) == results


def test_a_last_line_cut_short_is_written_again(cli_model, files, capsys, lines_at_each_result):
    prompts, out = files
    write_lines(prompts, *PROMPTS)
    done_before = {"id": "sea", "prompt": "The sea is", "text": "from an earlier run", "new_tokens": 6,
                   "tokens_per_step": 1.0, "seconds": 0.5}
    out.write_text(json.dumps(done_before) + '\n{"id": 2, "prompt": "Once upon a ti')
    code, _, err = run_file(capsys, cli_model, prompts, out)
    assert code == 0, err
    assert f"lookahead: {out}: its last line was cut short by an interrupted write; that prompt runs again\n" in err
    assert lines_at_each_result == [1, 2]
    results = read_results(out)
    assert results[0] == done_before
    assert [result["id"] for result in results] == ["sea", 2, 7]
    assert all(set(result) == RESULT_FIELDS for result in results)


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_a_prompt_the_model_cannot_take_names_its_line_before_any_decoding(cli_model, files, capsys,
                                                                           lines_at_each_result, batch_size):
    prompts, out = files
    write_lines(prompts, PROMPTS[0], {"prompt": "word " * CLI_MODEL_CONTEXT}, PROMPTS[2])
    code, _, err = run_file(capsys, cli_model, prompts, out, "--batch-size", batch_size)
    assert code == 2
    assert err.startswith(f"lookahead: error: {prompts}, line 2: prompt (")
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
    write_lines(prompts, *BATCH_PROMPTS)
    done_before = [{"id": id_, "prompt": "from an earlier run", "text": "", "new_tokens": 1, "tokens_per_step": 1.0,
                    "seconds": 0.5} for id_ in ("last", 4)]  # finished out of input order
    write_lines(out, *done_before)
    code, _, err = run_file(capsys, cli_model, prompts, out, "--batch-size", "3")
    assert code == 0, err
    assert lines_at_each_result == [2, 3, 4]
    results = read_results(out)
    assert results[:2] == done_before
    assert sorted(map(str, (result["id"] for result in results[2:]))) == ["long", "mid", "short"]

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
        (['{"prompt": "a"}', '{"prompt": "b"'], "line 2: not valid JSON (Expecting ',' delimiter at column 15)"),
        (['["a prompt"]'], "line 1: expected a JSON object, got a JSON array"),
        (['{"prompt": "a"}', '{"text": "b"}'], 'line 2: no "prompt" field'),
        (['{"prompt": 3}'], 'line 1: "prompt" must be a string, got a JSON number'),
        (['{"prompt": "a"}', "", '{"prompt": " \\n "}'], "line 3: the prompt is empty"),
        (['{"prompt": "\\ud800"}'], "line 1: the prompt is not valid UTF-8 text: undecodable character '\\ud800' at "
                                    "position 0 (was it written in another encoding?)"),
        (['{"prompt": "a", "id": "x"}', '{"prompt": "b"}', '{"prompt": "c", "id": "x"}'],
         'line 3: the id "x" is already used on line 1'),
        (['{"prompt": "a"}', '{"prompt": "b", "id": 1}'], "line 2: the id 1 is already used on line 1"),
        (['{"prompt": "a", "id": 1.5}'], 'line 1: "id" must be a string or an integer, got a JSON number'),
        (['{"prompt": "a", "max_new_tokens": 0}'], 'line 1: "max_new_tokens" must be a positive integer, got 0'),
    ],
    ids=["invalid-json", "not-an-object", "no-prompt", "number-prompt", "empty-prompt", "lone-surrogate",
         "duplicate-id", "duplicate-line-number", "float-id", "zero-max-new-tokens"],
)
def test_a_bad_line_is_named_before_the_model_loads(files, capsys, no_model, lines, message):
    prompts, out = files
    write_lines(prompts, *lines)
    code, stdout, err = run_file(capsys, "unused", prompts, out)
    assert (code, stdout) == (2, "")
    assert err == f"lookahead: error: {prompts}, {message}\n"
    assert not out.exists()


def test_bytes_that_are_not_utf8_name_their_line(files, capsys, no_model):
    prompts, out = files
    prompts.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    code, _, err = run_file(capsys, "unused", prompts, out)
    assert code == 2 and err == f"lookahead: error: {prompts}, line 2: not valid UTF-8 text\n"


@pytest.mark.parametrize(
    "prompts_text, results_text, options, message",
    [
        ("", None, [], "--prompts-file {prompts}: no prompts in it"),
        ("", None, ["--batch-size", "3"], "--prompts-file {prompts}: no prompts in it"),
        ("\n  \n", None, [], "--prompts-file {prompts}: no prompts in it"),
        (None, None, [], "--prompts-file {prompts}: cannot read it (No such file or directory)"),
        ('{"prompt": "a"}\n', '{"text": "b"}\n', [],
         '{out}, line 1: no "id" field: not a result line of --prompts-file (choose another --out)'),
        ('{"prompt": "a"}\n', None, ["--compare"], "--compare works on a single prompt, not with --prompts-file"),
        ('{"prompt": "a"}\n', None, ["--json"], "--json works on a single prompt, not with --prompts-file"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', None, ["--batch-size", "3"],
         "{prompts}, line 2: not valid JSON (Expecting ',' delimiter at column 15)"),
    ],
    ids=["empty", "empty-batch", "blank-lines", "missing", "foreign-results", "compare", "json", "bad-line-batch"],
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
