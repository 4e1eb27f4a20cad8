"""`lookahead serve`: an OpenAI-compatible HTTP server on the continuous-batching scheduler.

    engine_loop.py   the scheduler in its own thread: requests in through a queue, each row's new tokens out per step
    text.py          incremental detokenization and stop strings, on the HTTP side
    protocol.py      OpenAI request checking and response / chunk shapes
    app.py           the FastAPI routes

The library never imports this package; it needs the `serve` extra (fastapi, uvicorn).
"""
