"""Replicas on Ray Serve: N copies of the server (each its own model, engine thread and device) behind Ray Serve's
HTTP proxy, which routes every request to one of them. The routes are the single server's (`app.py`); Ray adds
the routing, restarts a replica whose engine failed (its health check), and drains replicas on shutdown.

`lookahead serve --replicas N` runs this on a local Ray instance (or joins `--ray-address`);
`serve run lookahead_decoding.serve.replicas:application model=PATH replicas=2` does the same from Ray's CLI, with
any `lookahead serve` option given as key=value (dashes or underscores; a flag as true or false). Needs the ray
extra.
"""

from __future__ import annotations

import argparse

from ray import serve


@serve.ingress()
class LookaheadReplica:
    """One replica: loads the model, starts its engine thread, and serves the OpenAI routes of `create_app`."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ..cli.common import load_from_args
        from ..cli.serve import build_app

        model, tokenizer = load_from_args(args)
        self.routes, self.engine = build_app(model, tokenizer, args)
        self.engine.start()

    def __serve_build_asgi_app__(self):
        return self.routes

    def check_health(self) -> None:
        # Ray restarts a replica whose check raises: an engine that died takes its replica down with it.
        if self.engine.error is not None:
            raise RuntimeError(f"the engine thread failed: {self.engine.error}")

    def __del__(self) -> None:
        # Ray Serve calls this after the replica's requests drained (graceful_shutdown_timeout_s).
        self.engine.stop()


def replica_application(args: argparse.Namespace, cuda: bool) -> serve.Application:
    """The Serve application of `args.replicas` replicas, each given one GPU (`cuda`) or one CPU."""
    resources = {"num_gpus": 1} if cuda else {"num_cpus": 1}
    deployment = serve.deployment(
        LookaheadReplica,
        name="lookahead",
        num_replicas=args.replicas,
        ray_actor_options=resources,
        # The server answers 429 itself once its own queue is full; Ray should pass every request through.
        max_ongoing_requests=args.max_queue,
        graceful_shutdown_timeout_s=args.drain_seconds,
    )
    return deployment.bind(args)


FLAG_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def application(options: dict[str, str]) -> serve.Application:
    """`serve run` entry point: `lookahead serve`'s options as key=value strings (a flag such as compile or
    device_drafts as true or false)."""
    from ..cli import build_parser
    from ..cli.common import wants_cuda

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags = {option for action in commands.choices["serve"]._actions if action.nargs == 0
             for option in action.option_strings}
    argv = ["serve"]
    for key, value in options.items():
        option = f"--{key.replace('_', '-')}"
        if option not in flags:
            argv += [option, value]
        elif str(value).lower() not in FLAG_VALUES:
            raise ValueError(f"serve run option {key} is a flag: give it true or false, got {value!r}")
        elif FLAG_VALUES[str(value).lower()]:
            argv.append(option)
    args = parser.parse_args(argv)
    if args.compile and not wants_cuda(args):
        raise ValueError("serve run option compile needs a CUDA device: it compiles the engine's CUDA-graph steps")
    if args.replicas is None:
        args.replicas = 1
    return replica_application(args, wants_cuda(args))
