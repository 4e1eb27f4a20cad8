"""`lookahead serve`: the OpenAI-compatible server (the `serve` extra: fastapi, uvicorn); with `--replicas N`,
N of them behind Ray Serve (the `ray` extra)."""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from pathlib import Path

from ..sampling_params import SamplingParams
from .common import (CommandError, add_lookahead_arguments, add_model_arguments, check_compile, config_from_args,
                     load_from_args, non_negative_int, positive_int, wants_cuda)
from .generate import DEFAULT_DRAFT_MEMORY

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# What a compiled server compiles before it listens, besides greedy steps: the sampling OpenAI clients ask for
# most, a temperature alone or with top-p (one set of graphs per set of sampling stages; the values do not matter).
STARTUP_SAMPLING = (SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_p=0.9))


def add_serve_command(commands) -> None:
    parser = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat completions, streaming)",
        description="Serve the model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health) with lookahead decoding and continuous batching. Needs the serve extra: "
        "pip install 'lookahead-decoding[serve]'.",
    )
    add_model_arguments(parser)
    add_lookahead_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=port_number, default=8000, help="1 to 65535 (default: 8000)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="B",
                        help="requests decoded side by side (default: 8)")
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--max-tokens", type=positive_int, default=512, metavar="M",
                        help="the most new tokens a request may ask for, and the chat default (default: 512)")
    parser.add_argument("--max-prompt-tokens", type=positive_int, metavar="P",
                        help="the longest prompt taken (default: the model's context less --max-tokens)")
    parser.add_argument("--max-queue", type=positive_int, default=256, metavar="Q",
                        help="requests waiting or decoding before new ones get 429 (default: 256)")
    parser.add_argument("--model-name", help="the model id clients ask for (default: derived from --model)")
    parser.add_argument("--drain-seconds", type=positive_int, default=60, metavar="S",
                        help="on SIGTERM, how long requests in flight may take to finish (default: 60)")
    parser.add_argument("--draft-memory", type=non_negative_int, default=DEFAULT_DRAFT_MEMORY, metavar="N",
                        help="draft from the text of the last N requests (a request opts out with "
                        "\"lookahead\": {\"draft_memory\": false}, which isolates it); 0 turns it off and "
                        "isolates every request (default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the engine's steps (CUDA only): fused kernels make every step cheaper, "
                        "at the cost of a slower start (greedy steps and those sampling with a temperature, alone "
                        "or with top-p, compile before the server listens; other sampling stages, such as top-k, "
                        "min-p or penalties, when a request first uses them)")
    parser.add_argument("--replicas", type=positive_int, metavar="N",
                        help="run N servers behind Ray Serve's router, each with its own model, engine and device "
                        "(one GPU each on CUDA, else one CPU); needs the ray extra (default: one server, no Ray)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --replicas: the Ray cluster to join (default: start one on this machine)")
    parser.set_defaults(func=run_serve)


def port_number(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 1 to 65535, got {port}")
    return port


def check_listening(host: str, port: int) -> None:
    """Fail now, before the model loads and the shapes are calibrated, if the server could not listen there (the
    port is taken, or the address is not this machine's). The socket closes at once; uvicorn binds it again."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn sets it
            probe.bind((host, port))
    except OSError as error:
        raise CommandError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def model_name(args: argparse.Namespace) -> str:
    if args.model_name:
        return args.model_name
    if args.model is None:
        return DEFAULT_MODEL_NAME
    path = Path(args.model)
    return path.stem if path.suffix == ".gguf" else path.name if path.exists() else args.model


def build_app(model, tokenizer, args: argparse.Namespace):
    """(FastAPI app, EngineLoop) for a loaded model and the serve options."""
    from ..decoding import AUTO, eos_set, open_scheduler
    from ..drafting.memory import DraftMemory
    from ..model_adapter import ModelAdapter
    from ..serve.app import create_app
    from ..serve.engine_loop import EngineLoop
    from ..serve.protocol import Limits

    context = ModelAdapter(model).context_length
    max_prompt = args.max_prompt_tokens or ((context - args.max_tokens) if context else 4096)
    if max_prompt < 1:
        raise CommandError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the model's context of "
                           f"{context} tokens")
    if context is not None and max_prompt + args.max_tokens > context:
        raise CommandError(f"--max-prompt-tokens {max_prompt} + --max-tokens {args.max_tokens} exceeds the model's "
                           f"context of {context} tokens")
    memory = DraftMemory(args.draft_memory) if args.draft_memory else None
    scheduler = open_scheduler(model, args.batch_size, max_prompt + args.max_tokens, config_from_args(args) or AUTO,
                               args.source, memory, compile=args.compile)
    if args.compile:  # compiled now rather than under the first request (greedy steps first, then these)
        for sampling in STARTUP_SAMPLING:
            scheduler.runner.capture_sampling(sampling)
    engine = EngineLoop(scheduler, args.max_queue)
    limits = Limits(max_prompt, args.max_tokens, ModelAdapter(model).vocab)
    app = create_app(engine, tokenizer, model_name(args), limits, eos_set(model), args.api_key)
    app.state.model = model  # the engine refers to its model weakly: the app keeps it alive as long as it serves
    return app, engine


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise CommandError("lookahead serve needs the serve extra: pip install 'lookahead-decoding[serve]'") from None
    if args.ray_address is not None and args.replicas is None:
        raise CommandError("--ray-address needs --replicas")
    check_compile(args)
    if args.ray_address is None:  # the server listens on this machine
        check_listening(args.host, args.port)
    if args.replicas is not None:
        return run_replicas(args)
    model, tokenizer = load_from_args(args)
    app, engine = build_app(model, tokenizer, args)
    # uvicorn drains on SIGTERM and then raises it again under the handler it found: with this one, a drained
    # server exits 0 instead of dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    engine.start()
    print(f"lookahead: serving {model_name(args)} on http://{args.host}:{args.port}; step plan: "
          f"{engine.scheduler.plan.describe()}", flush=True)
    try:
        # SIGTERM / Ctrl-C: uvicorn stops accepting, lets the requests in flight finish (up to the timeout), then
        # returns; the engine thread stops after them.
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.drain_seconds)
    finally:
        engine.stop()
    return 0


def run_replicas(args: argparse.Namespace) -> int:
    """--replicas N: N servers on Ray Serve, on this machine's Ray (or --ray-address's), until SIGTERM or Ctrl-C;
    then Ray drains every replica (up to --drain-seconds) and the command exits 0."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise CommandError("lookahead serve --replicas needs the ray extra: "
                           "pip install 'lookahead-decoding[serve,ray]'") from None
    from ..serve.replicas import replica_application

    cuda = wants_cuda(args)
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="warning")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(replica_application(args, cuda), name="lookahead", route_prefix="/")
        print(f"lookahead: {args.replicas} replica(s) serving on http://{args.host}:{args.port}", flush=True)
        stop.wait()
        # Deleting the application first drains its replicas while the proxy still delivers their answers (the
        # proxy refuses new requests meanwhile); shutting Serve down at once would cut the requests in flight.
        serve.delete("lookahead")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
