"""The `lookahead generate` command, on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLI_MODEL_CONTEXT as CONTEXT
from transformers import AutoTokenizer

import lookahead_decoding as ld
from lookahead_decoding import decoding
from lookahead_decoding.cli import main

torch.set_num_threads(1)

def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_compare_reports_identical_outputs_and_consistent_stats(cli_model, capsys):
    code, out, err = run(capsys, "The sea is", "--model", cli_model, "--max-new-tokens", "20", "--compare", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["identical"] is True
    assert result["prompt"] == "The sea is"
    assert result["config"] == "auto"
    assert result["sampling"] is None
    stats = result["stats"]
    shapes = [entry["shape"] for entry in result["shapes"]]
    assert shapes[0] == "plain" and shapes[-1].startswith("lookahead W=") and all(e["cost_ms"] > 0 for e in result["shapes"])
    assert set(stats["shape_steps"]) <= set(shapes) and sum(stats["shape_steps"].values()) == stats["steps"]
    assert 1 <= stats["new_tokens"] <= 20
    assert result["greedy"]["new_tokens"] == result["lookahead"]["new_tokens"] == stats["new_tokens"]
    # The prefill (one) commits the first token; every later token comes from a step counted in the histogram.
    assert stats["prefills"] == 1
    histogram = {int(k): v for k, v in stats["accepted_histogram"].items()}
    assert sum(histogram.values()) == stats["steps"]
    assert sum(k * v for k, v in histogram.items()) + 1 == stats["new_tokens"]
    assert all(1 <= k <= 1 + max(e["candidate_length"] for e in result["shapes"]) for k in histogram)
    speeds = result["lookahead"]["tokens_per_second"], result["greedy"]["tokens_per_second"]
    assert result["speedup"] == pytest.approx(speeds[0] / speeds[1])
    tokenizer = AutoTokenizer.from_pretrained(cli_model)
    assert result["text"] and len(tokenizer(result["text"]).input_ids) > 0


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_streamed_text_is_the_final_text(cli_model, capsys, chat):
    args = ["Once upon a time", "--model", cli_model, "--max-new-tokens", "24", "--window", "3", "--ngram", "3"]
    args += ["--chat"] if chat else []
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    text = json.loads(out)["text"]
    assert text.strip()

    code, out, err = run(capsys, *args, "--compare")
    assert code == 0, err
    # TextStreamer ends the stream with a newline, and a blank line separates the statistics.
    streamed, _, report = out.partition("\n\n-- lookahead decoding, window 3, ngram 3, guesses 7, candidate length 2\n")
    assert streamed == text
    assert out.count(text) == 1  # the greedy run of --compare decodes silently
    assert "tokens/step" in report and "tokens committed per step" in report
    assert "identical        yes, token for token" in report


def test_a_device_drafting_run_says_so_and_equals_greedy(cli_model, capsys):
    code, out, err = run(capsys, "Once upon a time", "--model", cli_model, "--max-new-tokens", "16", "--device-drafts",
                         "--candidate-length", "4", "--tree-nodes", "10", "--compare")
    assert code == 0, err
    assert "\n-- lookahead decoding, drafted on the device, tree nodes 10, candidate length 4\n" in out
    assert "device drafts B=10 K=4" in out and "identical        yes, token for token" in out


def test_chat_wraps_the_prompt_in_the_template(cli_model, capsys):
    tokenizer = AutoTokenizer.from_pretrained(cli_model)
    results = {}
    for chat in (False, True):
        code, out, err = run(capsys, "Hi there", "--model", cli_model, "--max-new-tokens", "6", "--json", *(["--chat"] * chat))
        assert code == 0, err
        results[chat] = json.loads(out)
    assert results[False]["prompt_tokens"] == len(tokenizer("Hi there").input_ids)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert results[True]["prompt_tokens"] == len(templated) > results[False]["prompt_tokens"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["", "--model", "{model}"], "prompt is empty"),
        (["   ", "--model", "{model}"], "prompt is empty"),
        (["hi", "--model", "{model}", "--window", "0"], "window must be >= 1"),
        (["hi", "--model", "{model}", "--ngram", "1"], "ngram must be >= 2"),
        (["hi", "--model", "{model}", "--guesses", "-1"], "guesses must be >= 0"),
        (["hi", "--model", "{model}", "--candidate-length", "0"], "candidate_length must be >= 1"),
        (["hi", "--model", "{missing}"], "does not exist"),
        (["word " * 600, "--model", "{model}"], f"exceeds the model's context length of {CONTEXT}"),
        (["hi", "--model", "{model}", "--max-new-tokens", "600", "--compare"], f"context length of {CONTEXT}"),
        (["hi", "--model", "{model}", "--window", "1000000"], "a lookahead step of W=1000000, N=5, G=7, B=28 has 4000028 "
         "tokens, more than the model's context"),
        (["hi", "--model", "{model}", "--window", "20000", "--ngram", "50"], "a lookahead step of W=20000, N=50, G=7"),
        (["hi", "--model", "{model}", "--temperature", "0.8", "--top-p", "2"],
         "top_p must be a number in (0, 1] (1 disables it), got 2.0"),
        (["hi", "--model", "{model}", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["hi", "--model", "{model}", "--temperature", "0.8", "--seed", "-3"], "seed must be an integer in [0, 2**63)"),
        (["hi", "--model", "{model}", "--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
        (["hi", "--model", "{model}", "--top-k", "5"], "--top-k shapes the sampled distribution: it needs --temperature"),
        (["hi", "--model", "{model}", "--temperature", "0.8", "--compare"],
         "--compare checks the output against greedy model.generate: it cannot be combined with --temperature"),
    ],
    ids=["empty", "blank", "window0", "ngram1", "guesses-1", "candidates0", "missing-model", "long-prompt",
         "long-output", "huge-window", "huge-window-and-ngram", "top-p", "temperature", "seed", "repetition-penalty",
         "top-k-greedy", "compare-sampling"],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(cli_model, tmp_path, capsys, argv, message):
    argv = [a.format(model=cli_model, missing=tmp_path / "no-such-model") for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("lookahead: error: ") and err.endswith("\n") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "0"), ("--window", "two"), ("--dtype", "int8"),
                                         ("--source", "pool,,suffix")])
def test_argparse_rejects_malformed_options_with_exit_2(capsys, flag, value):
    code, out, err = run(capsys, "hi", flag, value)
    assert code == 2
    assert out == ""
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize("argv, unrecognized", [(["--prompt", "hello"], "--prompt hello"),
                                                 (["--max-new", "5"], "--max-new 5")])
def test_an_abbreviated_option_is_unrecognized_not_taken_for_another(capsys, argv, unrecognized):
    # `--prompt` begins --prompts-file: taken for it, the error said the prompt clashes with a file.
    code, out, err = run(capsys, "hi", *argv)
    assert code == 2 and out == ""
    assert f"unrecognized arguments: {unrecognized}" in err and "prompts-file" not in err


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, passed",
    [([], None), (["--guesses", "2"], ld.LookaheadConfig(guesses=2)),
     (["--window", "3", "--ngram", "4", "--guesses", "2", "--candidate-length", "5"],
      ld.LookaheadConfig(3, 4, 2, candidate_length=5)),
     (["--device-drafts", "--candidate-length", "3", "--tree-nodes", "6"],
      ld.LookaheadConfig(1, 2, candidate_length=3, tree_nodes=6, device_drafts=True)),
     (["--device-drafts"], ld.LookaheadConfig(device_drafts=True))],
    ids=["none", "one", "all", "device drafts", "device drafts alone"],
)
def test_shape_options_left_out_leave_the_choice_to_the_library(cli_model, capsys, monkeypatch, options, passed):
    """generate gets config=None (auto) without options; the report shows the shapes of the plan the output used."""
    real_generate, configs, plans = decoding.generate, [], []

    def recording_generate(model, input_ids, max_new_tokens=128, config=None, **kwargs):
        configs.append(config)
        out = real_generate(model, input_ids, max_new_tokens, config, **kwargs)
        plans.append(out.plan)
        return out

    monkeypatch.setattr(decoding, "generate", recording_generate)
    code, out, err = run(capsys, "hi", "--model", cli_model, "--max-new-tokens", "4", "--json", *options)
    assert code == 0, err
    assert configs == [passed]
    result = json.loads(out)
    assert result["config"] == ("auto" if passed is None else {"window": passed.window, "ngram": passed.ngram,
                                                                 "guesses": passed.guesses,
                                                                 "candidate_length": passed.candidate_length,
                                                                 "tree_nodes": passed.tree_nodes,
                                                                 "device_drafts": passed.device_drafts})
    assert [entry["cost_ms"] for entry in result["shapes"]] == list(plans[0].costs_ms)


def test_a_seed_gives_the_same_sampled_text_with_any_step_shape(cli_model, capsys):
    """Every draw is keyed by (seed, position, token): a seed gives the same text again, with lookahead steps of any
    shape or with plain one-token steps."""
    sampled = ["The sea is", "--model", cli_model, "--max-new-tokens", "16", "--json", "--temperature", "0.8"]
    results = []
    for options in (["--seed", "3"], ["--seed", "3"], ["--seed", "3", "--window", "3", "--ngram", "3"],
                    ["--seed", "3", "--window", "1", "--ngram", "2", "--guesses", "0"], ["--seed", "4"], []):
        code, out, err = run(capsys, *sampled, *options)
        assert code == 0, err
        results.append(json.loads(out))
    texts = [result["text"] for result in results]
    assert texts[0].strip() and texts[1:4] == [texts[0]] * 3
    assert texts[4] != texts[0]  # another seed, other draws
    assert results[0]["sampling"] == {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                                      "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                                      "seed": 3}
    assert isinstance(results[5]["sampling"]["seed"], int)  # drawn, and reported so that the run can be repeated
    code, out, err = run(capsys, *sampled[:6])
    assert code == 0, err
    assert json.loads(out)["text"] != texts[0]  # greedy


def test_sampling_options_and_their_report(cli_model, capsys):
    code, out, err = run(capsys, "The sea is", "--model", cli_model, "--max-new-tokens", "8", "--temperature", "0.7",
                         "--top-k", "20", "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.2",
                         "--presence-penalty", "0.5", "--frequency-penalty", "0.25", "--seed", "11")
    assert code == 0, err
    assert ("\nsampling         temperature 0.7, top_k 20, top_p 0.9, min_p 0.05, repetition_penalty 1.2, "
            "presence_penalty 0.5, frequency_penalty 0.25, seed 11\n") in out


def test_prompts_file_samples_each_prompt_with_the_seed_plus_its_position(cli_model, tmp_path, capsys):
    """A prompt of the file draws as the single prompt does with --seed SEED + its position, side by side too."""
    prompts, results = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    lines = {"a": "The sea is", "b": "Once upon a time"}
    prompts.write_text("".join(json.dumps({"id": id_, "prompt": prompt}) + "\n" for id_, prompt in lines.items()))
    options = ["--model", cli_model, "--max-new-tokens", "12", "--temperature", "0.8", "--window", "3", "--ngram", "3"]
    code, _, err = run(capsys, "--prompts-file", str(prompts), "--out", str(results), "--batch-size", "2",
                       "--seed", "3", *options)
    assert code == 0, err
    written = {line["id"]: line for line in map(json.loads, results.read_text().splitlines())}
    assert {id_: line["seed"] for id_, line in written.items()} == {"a": 3, "b": 4}
    for id_, prompt in lines.items():
        code, out, err = run(capsys, prompt, "--seed", str(written[id_]["seed"]), "--json", *options)
        assert code == 0, err
        assert json.loads(out)["text"] == written[id_]["text"]


@pytest.mark.slow
def test_real_default_model_matches_greedy(capsys):
    code = main(["generate", "--chat", "--compare", "--max-new-tokens", "24", "--json", "Write a haiku about the sea."])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["identical"] is True
    assert result["stats"]["new_tokens"] == result["greedy"]["new_tokens"] > 0
    assert result["text"].strip()


def run_command(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tune_measures_every_shape_stores_the_plan_and_plots(cli_model, tmp_path, capsys, monkeypatch):
    from lookahead_decoding import plan_cache, runners, tuning

    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(tmp_path))
    plot = tmp_path / "tune.png"
    code, out, err = run_command(capsys, "tune", "--model", cli_model, "--json", "--plot", str(plot))
    assert code == 0, err
    result = json.loads(out[: out.rindex("}") + 1])
    measured = {row["shape"] for row in result["measured"]}
    assert {"plain", "lookahead W=3 N=4 G=3 K=12 B=9", "lookahead W=20 N=7 G=20 K=12 B=120"} <= measured
    assert {name for name in measured if name.startswith("verify")} == {f"verify B={b} K=12" for b in (4, 8, 16, 32)}
    assert all(row["cost_ms"] > 0 for row in result["measured"]) and result["measured"][0]["cost_vs_plain"] == 1.0
    assert plot.read_bytes().startswith(b"\x89PNG")
    stored = json.loads((tmp_path / plan_cache.CACHE_FILE).read_text())["plans"]
    assert len(stored) == 1 and tuning.StepPlan.from_dict(next(iter(stored.values()))).describe() == result["plan"]
    runners._plans.clear()


def test_tune_random_shape_is_measured_but_not_cached(tmp_path, capsys, monkeypatch):
    from lookahead_decoding.cli import tune

    monkeypatch.setenv("LOOKAHEAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(tune.RANDOM_SHAPES, "tiny-llama", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=512))
    code, out, err = run_command(capsys, "tune", "--random-shape", "tiny-llama", "--device", "cpu")
    assert code == 0, err
    assert out.startswith("calibration of tiny-llama on cpu (float32, dynamic engine)")
    assert "| plain | 1 |" in out and "| lookahead W=3 N=4 G=3 K=12 B=9 | 18 |" in out and "\nplan: plain " in out
    assert not (tmp_path / "calibration.json").exists()


def test_tune_random_shape_refuses_a_model_too(capsys):
    code, _, err = run_command(capsys, "tune", "--random-shape", "llama-3-8b", "--model", "some/model")
    assert code == 2
    assert err == "lookahead: error: --random-shape builds a model of random weights: it cannot take --model too\n"
