"""What the server tests share: a free port, waiting for a server process, and a stream read across a SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, seconds: float) -> None:
    """Until `url`/health answers 200 (Ray's proxy answers 503 or 404 before its replicas are up)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert server.poll() is None, server.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server was not serving after {seconds} s")


def stream_across_sigterm(url: str, server: subprocess.Popen, body: dict) -> str:
    """Stream a completion, send the server SIGTERM at its first event, and return the whole streamed text once
    the server exited 0 (it must finish the stream first)."""
    lines: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as response:
        for line in response.iter_lines():
            if not lines:
                server.send_signal(signal.SIGTERM)  # mid-stream
            lines.append(line)
    assert server.wait(timeout=180) == 0, server.stderr.read()
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return "".join(json.loads(event[len("data: "):])["choices"][0]["text"] for event in events[:-1])
