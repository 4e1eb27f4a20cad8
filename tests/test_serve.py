"""`lookahead serve` against a live uvicorn server on a free port, through the official `openai` client: the
answers equal `ld.generate`'s (greedy, float32), streams equal whole answers, stop strings, max_tokens, seeded
sampling, concurrency with continuous batching, disconnects, and every error with its status and OpenAI error
body. One server (the embedded model, 4 rows, an API key) serves the module."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import lookahead_decoding as ld
from lookahead_decoding.cli.common import encode_prompt
from lookahead_decoding.cli.serve import build_app
from conftest import cache_sharing_models, tiny_model
from serving import free_port, stream_across_sigterm, wait_until_serving

pytestmark = pytest.mark.slow
KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
CONFIG = ld.LookaheadConfig(3, 3, 3)  # fixed: no calibration in the tests


@pytest.fixture(scope="module")
def served():
    """(base URL, model, tokenizer, engine loop) of a running server."""
    torch.set_num_threads(1)
    model, tokenizer = ld.load_default_model()
    args = argparse.Namespace(model=None, model_name=None, max_tokens=32, max_prompt_tokens=120, batch_size=4,
                              max_queue=64, api_key=KEY, source=None, window=3, ngram=3, guesses=3,
                              candidate_length=None, tree_nodes=None, draft_memory=64, compile=False)
    app, engine = build_app(model, tokenizer, args)
    engine.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, tokenizer, engine
    server.should_exit = True
    thread.join()
    engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0)


def expected_text(served, prompt: str, max_tokens: int, chat: bool = False, **kwargs) -> str:
    _, model, tokenizer, _ = served
    ids = encode_prompt(tokenizer, prompt, chat)
    out = ld.generate(model, ids, max_tokens, CONFIG, **kwargs)
    return tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)


def test_completions_equal_generate(served, client):
    prompt = "def fibonacci(n):"
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert answer.choices[0].text == expected_text(served, prompt, 24)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 24
    assert answer.usage.prompt_tokens == len(served[2](prompt).input_ids)
    assert answer.usage.model_extra["lookahead"]["forwards"] >= 1


def test_a_chat_stream_equals_the_whole_answer(served, client):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content == expected_text(served, messages[0]["content"], 30,
                                                                          chat=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sixteen_concurrent_streams_each_equal_generate(served, client):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(16)]

    def stream(prompt):
        parts = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(part.choices[0].text for part in parts)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(stream, prompts))
    assert texts == [expected_text(served, prompt, 12) for prompt in prompts]


def test_a_stop_string_across_tokens_ends_the_answer(served, client):
    prompt = "def fibonacci(n):"
    full = expected_text(served, prompt, 32)
    tokenizer = served[2]
    ids = tokenizer(full, add_special_tokens=False).input_ids
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    boundary = len(pieces[len(ids) // 2])  # a token boundary in the middle of the text
    stop = full[boundary - 2 : boundary + 2]  # spans it
    assert stop.strip() and full.index(stop) < len(full)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stop=[stop])
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(part.choices[0].text for part in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stop=stop, stream=True))
    assert streamed == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_equals_generate(served, client):
    prompt = "Once upon a time"
    runs = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.8, top_p=0.95,
                                      seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    assert runs[0] == expected_text(served, prompt, 16, do_sample=True, temperature=0.8, top_p=0.95, seed=7)


def test_lookahead_can_be_turned_off_per_request(served, client):
    prompt = "1, 2, 3, 4, 5,"
    on = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    off = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"lookahead": {"enabled": False}})
    assert off.choices[0].text == on.choices[0].text
    assert off.usage.model_extra["lookahead"]["forwards"] == 24 - 1  # one token per step after the prefill's
    assert on.usage.model_extra["lookahead"]["forwards"] < 24 - 1


def test_a_repeated_request_drafts_from_the_memory_of_the_first(served, client):
    """The server's draft memory holds the first answer: the same request again takes fewer steps, same text. A
    request that opts out of the memory neither drafts from it nor is added to it."""
    prompt = "def count_vowels(text):"

    def ask(memory: bool):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                         extra_body={"lookahead": {"draft_memory": memory}})

    isolated = ask(False)
    first, again = ask(True), ask(True)
    steps = [answer.usage.model_extra["lookahead"]["forwards"] for answer in (isolated, first, again)]
    assert isolated.choices[0].text == first.choices[0].text == again.choices[0].text
    assert steps[2] < min(steps[:2])


def test_a_client_that_disconnects_frees_its_row(served, client):
    url, _, _, engine = served
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 32, "stream": True},
                      timeout=30) as response:
        next(response.iter_lines())  # the first event, then hang up
    deadline = time.time() + 10
    while (engine.running_rows or engine.queued) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running_rows == 0 and engine.queued == 0
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0).choices[0].text


def post(served, path, body=None, content=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{served[0]}{path}", json=body, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(("body", "status", "message", "param"), [
    ({"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "'logprobs' is not supported by this server", "logprobs"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "'n' must be 1: this server returns one choice per request", "n"),
    ({"model": MODEL, "prompt": "x", "best_of": 2}, 400, "'best_of' is not supported by this server", "best_of"),
    ({"model": MODEL, "prompt": "x", "colour": 2}, 400, "unknown field 'colour'", "colour"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "the model 'gpt-4' does not exist; this server serves "
                                             "'SmolLM2-135M-Instruct'", "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 33}, 400, "'max_tokens' must be in [1, 32], got 33", "max_tokens"),
    ({"model": MODEL, "prompt": "x " * 500}, 400, "the prompt has 501 tokens; this server takes at most 120",
     "prompt"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' holds 5 strings; at most 4",
     "stop"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p must be a number in (0, 1]", "top_p"),
    ({"model": MODEL, "prompt": "x", "lookahead": {"draft_memory": "no"}}, 400,
     "'lookahead' must be {\"enabled\": true or false, \"draft_memory\": true or false}", "lookahead"),
    ({"model": MODEL, "prompt": ""}, 400, "'prompt' must be a non-empty string (or one list of token ids)", "prompt"),
    ({"model": MODEL, "prompt": [1, 10**6]}, 400, "'prompt' holds token ids outside the model's vocabulary [0, 49152)",
     "prompt"),
])
def test_bad_requests_get_an_openai_error(served, body, status, message, param):
    response = post(served, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"].startswith(message) and error["param"] == param


def test_tools_are_refused_on_chat(served):
    response = post(served, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "tools": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_malformed_json_oversized_bodies_and_keys(served):
    response = post(served, "/v1/completions", content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["message"].startswith(
        "the request body is not valid JSON")
    response = post(served, "/v1/completions", content=b"{" + b" " * (1 << 20) + b"}")
    assert response.status_code == 413
    for key in (None, "wrong"):
        response = post(served, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{served[0]}/health").json()["status"] == "ok"  # no key needed


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL]


class CharTokenizer:
    """One token per byte of UTF-8: a multi-byte character arrives in pieces, as byte-level BPE can send it."""

    def __call__(self, text):
        return argparse.Namespace(input_ids=list(text.encode()))

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode(errors="replace")


def test_text_is_released_whole_characters_at_a_time_and_stops_before_a_stop_string():
    from lookahead_decoding.serve.text import TextStream

    text = TextStream(CharTokenizer(), stop=["END"])
    pieces = [text.add([byte]) for byte in "héllo wörld E".encode()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == "héllo wörld"  # " E" could begin "END": held back until it cannot
    assert text.add(list(b"ND and more")) == " " and text.stopped and text.rest() == ""
    free = TextStream(CharTokenizer(), stop=["END"])
    assert "".join(free.add([byte]) for byte in "ab EN".encode()) + free.rest() == "ab EN"


def test_a_full_queue_answers_429_with_retry_after():
    from fastapi.testclient import TestClient

    from lookahead_decoding.serve.app import create_app
    from lookahead_decoding.serve.protocol import Limits

    scheduler = argparse.Namespace(stats=ld.GenerationStats(), steps_by_shape={}, step_costs_ms={}, step_yields={},
                                   memory=None,
                                   runner=argparse.Namespace(adapter=argparse.Namespace(device=torch.device("cpu"))))
    full = argparse.Namespace(submit=lambda request, stream: False, error=None, running_rows=4, queued=8,
                              scheduler=scheduler)
    app = create_app(full, CharTokenizer(), MODEL, Limits(100, 10, 256), eos_ids=set())
    response = TestClient(app).post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_metrics_after_a_run(served, client):
    client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=8, temperature=0)
    text = httpx.get(f"{served[0]}/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['lookahead_requests_total{status="200"}'] >= 1
    assert values["lookahead_generated_tokens_total"] >= 8 and values["lookahead_forwards_total"] >= 1
    assert values["lookahead_time_to_first_token_seconds_count"] >= 1
    assert values["lookahead_time_per_output_token_seconds_count"] >= 1
    assert values["lookahead_tokens_per_step_count"] >= values["lookahead_forwards_total"]
    assert values["lookahead_running_rows"] == 0 and values["lookahead_queue_depth"] == 0
    assert any(name.startswith("lookahead_step_shapes_total{shape=") for name in values)
    scheduler = served[3].scheduler  # 4 rows: costs measured as they run, yields learnt
    for shape, cost in scheduler.step_costs_ms.items():
        assert values[f'lookahead_step_cost_milliseconds{{shape="{shape}"}}'] == pytest.approx(cost) and cost > 0
        assert values[f'lookahead_step_yield_ratio{{shape="{shape}"}}'] >= 0
    assert len(scheduler.step_costs_ms) == len(scheduler.plan.shapes)
    memory = served[3].scheduler.memory  # the request above is in the draft memory now
    assert values["lookahead_draft_memory_requests"] == len(memory) >= 1
    assert values["lookahead_draft_memory_tokens"] == memory.tokens >= 8
    assert values["process_resident_memory_bytes"] > 0


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(served, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lookahead_decoding.cli", "serve", "--port", str(port), "--batch-size", "2",
         "--max-tokens", "48", "--max-prompt-tokens", "64", "--window", "3", "--ngram", "3", "--guesses", "3"],
        env={**os.environ, "LOOKAHEAD_CACHE_DIR": cache_sharing_models(tmp_path)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "prompt": "Write a poem about the sea.", "max_tokens": 48, "temperature": 0}
    try:
        wait_until_serving(url, server, 120)
        text = stream_across_sigterm(url, server, body)
    finally:
        server.kill()
    assert text == expected_text(served, body["prompt"], 48)  # the whole answer: not cut short
    assert server.stdout.read() == (f"lookahead: serving {MODEL} on {url}; step plan: lookahead W=3 N=3 G=3 K=2 B=6 "
                                    "(one shape)\n")


def draft_memory_requests(url: str) -> float:
    from lookahead_decoding.bench.serve_load import metric_samples

    page = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return next(s.value for s in metric_samples(page) if s.name == "lookahead_draft_memory_requests")


def test_bench_serve_loads_the_server_with_lookahead_on_and_off(served, tmp_path):
    from pathlib import Path

    from lookahead_decoding.cli import main

    data = Path(__file__).parent / "fixtures" / "HumanEval.jsonl.gz"
    out, plot = tmp_path / "load.json", tmp_path / "load.png"
    remembered = draft_memory_requests(served[0])
    code = main(["bench-serve", "--url", served[0], "--api-key", KEY, "--dataset", "humaneval", "--data-file",
                 str(data), "--limit", "3", "--concurrency", "1,3", "--max-tokens", "6", "--warmup", "1", "--out",
                 str(out), "--plot", str(plot)])
    assert code == 0 and plot.stat().st_size > 0
    # The sweep repeats its prompts: none of its requests may reach the draft memory.
    assert draft_memory_requests(served[0]) == remembered
    settings = json.loads(out.read_text())["settings"]
    assert [(s["lookahead"], s["concurrency"]) for s in settings] == [(True, 1), (True, 3), (False, 1), (False, 3)]
    for setting in settings:
        assert setting["errors"] == 0 and setting["requests"] == 3 and 3 <= setting["tokens"] <= 18
        assert setting["ttft_p50"] > 0 and setting["tokens_per_second"] > 0
        # The server's steps of the setting (its warm-up not counted): off, a row commits one token per step
        # after the first (its prefill's).
        steps = sum(setting["steps_by_shape"].values())
        assert 0 < steps <= setting["tokens"]
        assert setting["lookahead"] or steps * setting["concurrency"] >= setting["tokens"] - setting["requests"]
        assert setting["step_cost_ms"].keys() == served[3].scheduler.step_costs_ms.keys()  # at the setting's end
        assert all(cost > 0 for cost in setting["step_cost_ms"].values())
    assert settings[-1]["step_cost_ms"] == pytest.approx(served[3].scheduler.step_costs_ms)
    # float32 greedy: with lookahead on, every answer is the one the same prompt got with it off
    assert [s.get("same_text_as_off") for s in settings] == [3, 3, None, None]


def test_ray_address_needs_replicas(capsys):
    from lookahead_decoding.cli import main

    assert main(["serve", "--ray-address", "auto"]) == 2
    assert capsys.readouterr().err == "lookahead: error: --ray-address needs --replicas\n"


def test_compile_needs_cuda(capsys):
    """Refused before the model loads by the command, and by the scheduler for a model off CUDA."""
    from lookahead_decoding.cli import main
    from lookahead_decoding.decoding import open_scheduler

    assert main(["serve", "--compile", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("lookahead: error: --compile needs a CUDA device: it compiles the engine's "
                                       "CUDA-graph steps\n")
    with pytest.raises(ValueError, match=r"^compile needs a CUDA device \(it compiles the engine's captured steps\); "
                                         r"the model is on cpu$"):
        open_scheduler(tiny_model("llama"), 2, 64, compile=True)


def test_a_port_out_of_range_or_taken_is_refused_before_the_model_loads(capsys, monkeypatch):
    from lookahead_decoding.cli import main, serve as serve_command

    assert main(["serve", "--port", "70000"]) == 2
    assert "argument --port: must be a port number, 1 to 65535, got 70000" in capsys.readouterr().err

    def no_loading(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serve_command, "load_from_args", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert capsys.readouterr().err == f"lookahead: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_bench_serve_soak_counts_every_request_once_with_hang_ups(served, tmp_path):
    from pathlib import Path

    from lookahead_decoding.cli import main

    data = Path(__file__).parent / "fixtures" / "HumanEval.jsonl.gz"
    out, plot = tmp_path / "soak.json", tmp_path / "soak.png"
    code = main(["bench-serve", "--url", served[0], "--api-key", KEY, "--dataset", "humaneval", "--data-file",
                 str(data), "--limit", "2", "--concurrency", "3", "--max-tokens", "8", "--soak", "6",
                 "--disconnect-share", "0.5", "--out", str(out), "--plot", str(plot)])
    assert code == 0 and plot.stat().st_size > 0
    soak = json.loads(out.read_text())["soak"]
    assert soak["errors"] == 0 and soak["cut"] > 0 and soak["done"] > 0
    assert soak["sent"] == soak["done"] + soak["cut"] == soak["server_answered"]
    assert soak["bodies_with_differing_answers"] == 0  # float32: every greedy or seeded answer repeats exactly
    assert soak["memory"] and soak["memory"][0]["rss"] > 0


def test_a_server_without_a_draft_memory_isolates_every_request():
    """--draft-memory 0: with drafting on the device too, a request drafts from nothing an earlier one taught the
    engine's tables, so the same request twice takes the same forwards."""
    from fastapi.testclient import TestClient

    torch.set_num_threads(1)
    model, tokenizer = ld.load_default_model()
    args = argparse.Namespace(model=None, model_name=None, max_tokens=24, max_prompt_tokens=64, batch_size=1,
                              max_queue=4, api_key=None, source=None, window=1, ngram=2, guesses=1,
                              candidate_length=6, tree_nodes=15, device_drafts=True, draft_memory=0,
                              compile=False)
    app, engine = build_app(model, tokenizer, args)
    engine.start()
    try:
        with TestClient(app) as http:
            answers = [http.post("/v1/completions", json={"model": MODEL, "prompt": "def count_vowels(text):",
                                                          "max_tokens": 24, "temperature": 0}).json()
                       for _ in range(2)]
    finally:
        engine.stop()
    assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
    assert answers[0]["usage"]["lookahead"]["forwards"] == answers[1]["usage"]["lookahead"]["forwards"]
