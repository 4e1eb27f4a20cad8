"""Start-up of the `lookahead` command: what answers without torch, and Ctrl-C before decoding begins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from lookahead_decoding import models
from lookahead_decoding.cli import main

HEAVY = ("torch", "transformers", "matplotlib", "tqdm")

# Each argv is run in one fresh interpreter; none may import a heavy package.
LIGHT_COMMANDS = [
    ["--help"],
    ["generate", "--help"],
    ["bench", "--help"],
    [],  # no command
    ["generate"],  # no prompt
    ["generate", "hi", "--window", "two"],
    ["bench", "--dataset", "squad"],
    ["generate", "   "],  # empty prompt
    ["generate", "hi", "--ngram", "1"],  # invalid configuration
    ["bench", "--dataset", "gsm8k", "--out", "{tmp}"],  # unwritable --out
]
PROBE = """
import contextlib, io, json, sys
from lookahead_decoding.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes.append(main(argv))
print(json.dumps({"codes": codes, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def python(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, timeout=120, check=False)


def test_help_and_usage_errors_do_not_import_torch(tmp_path):
    argvs = [[arg.format(tmp=tmp_path) for arg in argv] for argv in LIGHT_COMMANDS]
    done = python("-c", PROBE, json.dumps(argvs))
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["codes"] == [0, 0, 0] + [2] * (len(LIGHT_COMMANDS) - 3)
    assert result["loaded"] == []


def test_console_module_help_exits_0():
    done = python("-m", "lookahead_decoding.cli", "--help")
    assert done.returncode == 0 and b"generate" in done.stdout and b"bench" in done.stdout


@pytest.mark.skipif(os.name != "posix", reason="argv bytes are decoded with surrogateescape on POSIX")
def test_prompt_bytes_that_are_not_utf8_are_one_clear_line():
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-m", "lookahead_decoding.cli", "generate", b"caf\xe9 au lait"],
                          capture_output=True, timeout=120, check=False, env=env)
    assert done.returncode == 2
    assert done.stderr.decode() == (
        "lookahead: error: the prompt is not valid UTF-8 text: undecodable character '\\udce9' at position 3 "
        "(was it written in another encoding?)\n"
    )


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv", [["generate", "hi"], ["bench", "--dataset", "gsm8k", "--data-file", "{data}"]],
                         ids=["generate", "bench"])
def test_ctrl_c_while_loading_the_model_exits_130_quietly(monkeypatch, capsys, tmp_path, argv):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "q"}) + "\n")
    monkeypatch.setattr(models, "load_default_model", interrupt)
    assert main([arg.format(data=data) for arg in argv]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "\n"


class InterruptedModule(types.ModuleType):
    """A module whose every attribute lookup is interrupted, like a Ctrl-C in the middle of its import."""

    def __getattr__(self, name):
        raise KeyboardInterrupt


def test_ctrl_c_during_the_lazy_imports_exits_130_quietly(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lookahead_decoding.decoding", InterruptedModule("lookahead_decoding.decoding"))
    assert main(["generate", "hi"]) == 130
    assert capsys.readouterr().err == "\n"


def test_the_library_and_generate_do_not_import_matplotlib():
    """matplotlib comes with the [bench] extra only."""
    code = ("import sys, lookahead_decoding.cli.generate, lookahead_decoding.decoding, lookahead_decoding.engine, "
            "lookahead_decoding.models, lookahead_decoding.hf_integration; print('matplotlib' in sys.modules)")
    done = python("-c", code)
    assert done.returncode == 0 and done.stdout == b"False\n", done.stderr.decode()


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    for module in ("matplotlib", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if it were not installed
    assert main(["bench", "--dataset", "gsm8k", "--plot", str(tmp_path / "r.png")]) == 2
    assert capsys.readouterr().err == (
        "lookahead: error: --plot: lookahead bench needs the 'matplotlib' package: pip install "
        "'lookahead-decoding[bench]'\n"
    )
