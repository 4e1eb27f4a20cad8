"""`lookahead bench-serve`: load on a running `lookahead serve`, at several concurrencies, lookahead on and off.

Every prompt of a dataset goes to the server as one streamed request (chat datasets through chat completions,
the others through completions), at most `concurrency` at a time. Per request: time to first token (the first
chunk with text), time per output token after it, tokens (the usage the server reports). Per setting: p50 / p95 of
both, requests and tokens per second over the wall time of the whole setting, and errors. Lookahead on and off
run against the same server, so their ratio is the speedup a client sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from .data import DATASETS, load_prompts


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def one_request(client, url: str, body: dict) -> dict:
    """Send one streamed request; its timings, tokens and error (None when it succeeded)."""
    began = time.perf_counter()
    first = None
    usage = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text and first is None:
                        first = time.perf_counter()
    except Exception as err:  # a load test reports failures, it does not stop at the first
        return {"error": f"{type(err).__name__}: {err}"}
    ended = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    return {"error": None, "seconds": ended - began, "tokens": tokens,
            "ttft": None if first is None else first - began,
            "tpot": None if first is None or tokens < 2 else (ended - first) / (tokens - 1),
            "forwards": usage["lookahead"]["forwards"] if usage else 0}


async def run_setting(base: str, headers: dict, bodies: list[tuple[str, dict]], concurrency: int) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as client:
        async def gated(path, body):
            async with gate:
                return await one_request(client, path, body)

        began = time.perf_counter()
        results = await asyncio.gather(*(gated(path, body) for path, body in bodies))
        wall = time.perf_counter() - began
    done = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    tpot = [r["tpot"] for r in done if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in done)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(done),
            "error_messages": sorted({r["error"] for r in results if r["error"]})[:5],
            "wall_seconds": wall, "requests_per_second": len(done) / wall, "tokens_per_second": tokens / wall,
            "tokens": tokens, "tokens_per_step": tokens / max(sum(r["forwards"] for r in done), 1),
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "tpot_p50": percentile(tpot, 0.5), "tpot_p95": percentile(tpot, 0.95),
            "tpot_mean": statistics.fmean(tpot) if tpot else None}


def request_bodies(args, model: str, lookahead: bool) -> list[tuple[str, dict]]:
    prompts = load_prompts(args.dataset, args.data_file, args.limit)
    common = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
              "stream_options": {"include_usage": True}, "lookahead": {"enabled": lookahead}}
    if DATASETS[args.dataset].chat:
        return [("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": p.text}]})
                for p in prompts]
    return [("/v1/completions", {**common, "prompt": p.text}) for p in prompts]


def measure(args) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model_name or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
    settings = []
    for lookahead in (True, False):
        bodies = request_bodies(args, model, lookahead)
        for concurrency in args.concurrency:
            result = asyncio.run(run_setting(args.url, headers, bodies, concurrency))
            settings.append({"lookahead": lookahead, **result})
            print(f"lookahead {'on ' if lookahead else 'off'} concurrency {concurrency:3d}: "
                  f"{result['tokens_per_second']:8.1f} tok/s, TTFT p50 {result['ttft_p50']}, "
                  f"TPOT p50 {result['tpot_p50']}, errors {result['errors']}", flush=True)
    return {"config": {key: value for key, value in vars(args).items() if key != "func"}, "model": model,
            "settings": settings}


def report(result: dict) -> str:
    rows = ["| lookahead | concurrency | tok/s | req/s | TTFT p50 / p95 (ms) | TPOT p50 / p95 (ms) | tokens/step | "
            "errors |", "|---|---|---|---|---|---|---|---|"]
    ms = lambda value: "-" if value is None else f"{value * 1e3:.1f}"  # noqa: E731
    for s in result["settings"]:
        rows.append(f"| {'on' if s['lookahead'] else 'off'} | {s['concurrency']} | {s['tokens_per_second']:.1f} | "
                    f"{s['requests_per_second']:.2f} | {ms(s['ttft_p50'])} / {ms(s['ttft_p95'])} | "
                    f"{ms(s['tpot_p50'])} / {ms(s['tpot_p95'])} | {s['tokens_per_step']:.2f} | {s['errors']} |")
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for lookahead in (True, False):
        points = [s for s in result["settings"] if s["lookahead"] == lookahead]
        label = f"lookahead {'on' if lookahead else 'off'}"
        throughput.plot([s["concurrency"] for s in points], [s["tokens_per_second"] for s in points], "o-",
                        label=label)
        latency.plot([s["concurrency"] for s in points], [(s["tpot_p50"] or 0) * 1e3 for s in points], "o-",
                     label=label)
    throughput.set(xlabel="concurrent requests", ylabel="tokens/s", xscale="log")
    latency.set(xlabel="concurrent requests", ylabel="TPOT p50 (ms)", xscale="log")
    throughput.legend()
    figure.suptitle(f"lookahead serve, {result['config']['dataset']}, {result['model']}")
    figure.tight_layout()
    figure.savefig(path)


def add_bench_serve_parser(subparsers) -> None:
    from ..cli.common import positive_int
    from .cli import int_list

    def concurrency_list(text: str) -> list[int]:
        values = int_list(text)
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f"concurrencies must be positive integers, got {text!r}")
        return values

    parser = subparsers.add_parser("bench-serve", help="load a running `lookahead serve` at several concurrencies",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--api-key", metavar="KEY")
    parser.add_argument("--model-name", help="default: the server's first model")
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--data-file", metavar="PATH", help="local copy of the dataset (default: from the Hub)")
    parser.add_argument("--limit", type=positive_int, metavar="K", help="first K prompts only")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 8, 32, 64], metavar="C[,C...]",
                        help="requests in flight at once (default: 1,8,32,64)")
    parser.add_argument("--max-tokens", type=positive_int, default=256, metavar="M")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--out", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG: throughput and TPOT against concurrency")
    parser.set_defaults(func=run_bench_serve)


def run_bench_serve(args: argparse.Namespace) -> int:
    result = measure(args)
    print(report(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0
