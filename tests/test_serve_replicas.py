"""`lookahead serve --replicas 2` on a local Ray instance (the ray extra), with two CPU replicas: both serve, their
answers equal `ld.generate`'s (greedy, float32), and SIGTERM drains a stream in flight before the command exits
0. Skipped where ray is not installed (the test extra installs it)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

import lookahead_decoding as ld  # noqa: E402
from lookahead_decoding.cli.common import encode_prompt  # noqa: E402
from conftest import cache_sharing_models  # noqa: E402
from serving import free_port, stream_across_sigterm, wait_until_serving  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 24
PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time"]


def complete(url: str, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def test_two_replicas_serve_exact_answers_and_drain_on_sigterm(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LOOKAHEAD_CACHE_DIR": cache_sharing_models(tmp_path),
           # Ray's proxy lingers 30 s after its routes are gone by default; a test has no clients to wait for.
           "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "lookahead_decoding.cli", "serve", "--replicas", "2", "--port", str(port),
         "--batch-size", "2", "--max-tokens", "48", "--max-prompt-tokens", "64", "--window", "3", "--ngram", "3",
         "--guesses", "3"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(url, server, 240)
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda prompt: complete(url, prompt), PROMPTS))
        # Ray routes each request to one replica; over many requests both must answer.
        pids = {httpx.get(f"{url}/health", timeout=30).json()["pid"] for _ in range(40)}
        assert len(pids) == 2

        body = {"model": MODEL, "prompt": "Write a poem about the sea.", "max_tokens": 48, "temperature": 0}
        streamed = stream_across_sigterm(url, server, body)
    finally:
        server.kill()

    model, tokenizer = ld.load_default_model()
    config = ld.LookaheadConfig(3, 3, 3)

    def expected(prompt: str, max_tokens: int) -> str:
        ids = encode_prompt(tokenizer, prompt, False)
        out = ld.generate(model, ids, max_tokens, config)
        return tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)

    assert answers == [expected(prompt, MAX_TOKENS) for prompt in PROMPTS]
    assert streamed == expected(body["prompt"], 48)  # the whole answer: the drain did not cut it short


def test_serve_run_builds_the_replicas_from_key_value_options():
    from lookahead_decoding.serve.replicas import application

    app = application({"replicas": "3", "batch_size": "4", "drain-seconds": "7", "device": "cpu"})
    deployment = app._bound_deployment  # what `serve run` would deploy
    assert (deployment.name, deployment.num_replicas) == ("lookahead", 3)
    assert deployment.ray_actor_options["num_cpus"] == 1
    args = app._bound_deployment.init_args[0]
    assert (args.batch_size, args.drain_seconds, args.replicas) == (4, 7, 3)
    assert not args.compile and args.device_drafts is None
    flags = application({"device": "cuda", "compile": "True", "device_drafts": "yes"})._bound_deployment.init_args[0]
    assert flags.compile and flags.device_drafts
    off = application({"device": "cpu", "compile": "false"})._bound_deployment.init_args[0]
    assert not off.compile
    with pytest.raises(ValueError, match=r"^serve run option compile is a flag: give it true or false, got 'maybe'$"):
        application({"compile": "maybe"})
    with pytest.raises(ValueError, match=r"^serve run option compile needs a CUDA device"):
        application({"device": "cpu", "compile": "true"})
