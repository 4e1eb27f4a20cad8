"""The HTTP routes: OpenAI's completions and chat completions (streamed as server-sent events or answered whole),
the model list, a health check and the Prometheus metrics. Requests are checked and tokenized here, decoded by
the engine thread (`engine_loop.py`), and their tokens turned into text here as they arrive (`text.py`)."""

from __future__ import annotations

import asyncio
import json
import os
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..scheduler import Request
from .engine_loop import EngineLoop, TokenStream
from .metrics import Metrics
from .protocol import APIError, Generation, Limits, chunk, parse, response, usage
from .text import TextStream

MAX_BODY_BYTES = 1 << 20


def create_app(engine: EngineLoop, tokenizer, model_name: str, limits: Limits, eos_ids: set[int],
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="lookahead-decoding")
    created = int(time.time())
    metrics = Metrics(engine)

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def authorize(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                error = APIError(401, "a valid API key is needed: 'Authorization: Bearer KEY'",
                                 kind="authentication_error")
                metrics.requests.labels("401").inc()
                return JSONResponse(error.body(), status_code=401)
        answer = await call_next(request)
        if request.method == "POST" and request.url.path.startswith("/v1/"):
            metrics.requests.labels(str(answer.status_code)).inc()
        return answer

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        # The process id tells replicas apart behind a router.
        return {"status": "ok", "running_rows": engine.running_rows, "queued": engine.queued, "pid": os.getpid()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lookahead-decoding"}]}

    async def generate(kind: str, request: HTTPRequest):
        arrived = time.perf_counter()
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request body has {len(raw)} bytes; at most {max_body_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        generation = await asyncio.to_thread(parse, kind, body, tokenizer, model_name, limits)
        stream = TokenStream(asyncio.get_running_loop())
        decoded = Request(generation.prompt_ids, generation.max_tokens, eos_ids, tag=generation.id,
                          sampling=generation.sampling, lookahead=generation.lookahead,
                          use_memory=generation.draft_memory and engine.scheduler.memory is not None)
        if not engine.submit(decoded, stream):
            raise APIError(429, "the server's queue is full; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        if generation.stream:
            return StreamingResponse(events(generation, stream, arrived), media_type="text/event-stream")
        text, finish_reason, used = [], None, None
        async for piece, finish_reason, used in pieces(generation, stream, arrived):
            text.append(piece)
        return response(generation, "".join(text), finish_reason, used)

    async def pieces(generation: Generation, stream: TokenStream, arrived: float):
        """(new text, finish reason or None, usage or None) as the engine commits tokens; the request's row is
        freed early when a stop string ends it or the consumer goes away. Timings go to the metrics."""
        text = TextStream(tokenizer, generation.stop)
        finished, first_token = False, None
        try:
            while True:
                kind, payload = await stream.events.get()
                if kind == "tokens":
                    if first_token is None:
                        first_token = time.perf_counter()
                        metrics.time_to_first_token.observe(first_token - arrived)
                    new = text.add(payload)
                    if text.stopped:
                        engine.cancel(generation.id)
                        finished = True
                        yield new, "stop", usage(generation, len(text.tokens), None)
                        return
                    if new:
                        yield new, None, None
                elif kind == "done":
                    finished = True
                    if first_token is not None and len(text.tokens) > 1:
                        metrics.time_per_output_token.observe((time.perf_counter() - first_token)
                                                              / (len(text.tokens) - 1))
                    eos = bool(text.tokens) and text.tokens[-1] in eos_ids
                    reason = "length" if not eos and len(text.tokens) >= generation.max_tokens else "stop"
                    yield text.rest(), reason, usage(generation, len(text.tokens), payload)
                    return
                else:
                    raise APIError(500, str(payload), kind="server_error")
        finally:
            if not finished:  # the client went away: free the row
                engine.cancel(generation.id)

    async def events(generation: Generation, stream: TokenStream, arrived: float):
        yield sse(chunk(generation, "", first=True))
        async for piece, finish_reason, used in pieces(generation, stream, arrived):
            if piece:
                yield sse(chunk(generation, piece))
            if finish_reason is not None:
                yield sse(chunk(generation, None, finish_reason))
                if generation.include_usage:
                    yield sse(chunk(generation, None, usage_=used))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await generate("chat", request)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
