"""`lookahead bench-serve`: load on a running `lookahead serve`, at several concurrencies, lookahead on and off.

Every prompt of a dataset goes to the server as one streamed request (chat datasets through chat completions,
the others through completions), at most `concurrency` at a time. Per request: time to first token (the first
chunk with text), time per output token after it, tokens (the usage the server reports). Per setting: p50 / p95 of
both, requests and tokens per second over the wall time of the whole setting, errors, the server's steps by
shape (from /metrics), and how many answers with lookahead on equal the same prompt's answer with it off
(prompt i asks for seed i, so sampled answers compare too). Each setting first sends its first `--warmup`
requests untimed: a server records a step shape's CUDA graph the first time it takes that shape. Lookahead on and
off run against the same server, so their ratio is the speedup a client sees. Every request of the sweep opts out
of the server's draft memory (`"lookahead": {"draft_memory": false}`): the warm-up and every setting send the same
prompts, and a memory would draft each answer from the same prompt's earlier one. `--draft-memory` lets the
measured requests (not the warm-up) use it, for a sweep of one setting on prompts the server has not seen.

`--soak SECONDS` instead keeps `--concurrency` requests in flight for that long: each prompt greedy and sampled
(temperature 0.7, seeded by its index), and a `--disconnect-share` of them hung up after 1 to 3 chunks. It checks
that nothing is lost or doubled (every stream not hung up ends with one finish reason and one `[DONE]`, and the
server counted every request once), that every answer to one request body is the same text (exact in float32:
lower precisions move with the batch), and watches the server's memory (`/metrics`) for growth after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time

from .data import DATASETS, load_prompts


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def event_text(event: dict) -> str:
    """The text of one completions or chat-completions chunk."""
    return "".join(choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                   for choice in event.get("choices", []))


async def stream_request(client, url: str, body: dict, hang_up_after: int | None = None) -> dict:
    """Send one streamed request (hanging up after `hang_up_after` chunks, if given). Its error (None when it was
    answered), whether it was hung up on, its text, finish reasons and [DONE]s counted, and its timings and
    tokens."""
    began = time.perf_counter()
    first, usage, pieces, finishes, dones = None, None, [], 0, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"}
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    dones += 1
                    continue
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                usage = event.get("usage") or usage
                pieces.append(event_text(event))
                finishes += sum(choice.get("finish_reason") is not None for choice in event.get("choices", []))
                if first is None and pieces[-1]:
                    first = time.perf_counter()
                if hang_up_after is not None and len(pieces) >= hang_up_after:
                    return {"error": None, "cut": True}
    except Exception as err:  # a load test reports failures, it does not stop at the first
        return {"error": f"{type(err).__name__}: {err}"}
    ended = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    return {"error": None, "cut": False, "seconds": ended - began, "tokens": tokens, "text": "".join(pieces),
            "finishes": finishes, "dones": dones, "ttft": None if first is None else first - began,
            "tpot": None if first is None or tokens < 2 else (ended - first) / (tokens - 1),
            "forwards": usage["lookahead"]["forwards"] if usage else 0}


async def run_setting(base: str, headers: dict, bodies: list[tuple[str, dict]], concurrency: int) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as client:
        async def gated(path, body):
            async with gate:
                return await stream_request(client, path, body)

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
            "tpot_mean": statistics.fmean(tpot) if tpot else None,
            "texts": [r.get("text") for r in results]}  # in request order; compared across settings, not kept


def request_bodies(args, model: str, lookahead: bool, temperature: float | None = None,
                   seeded: bool = False, draft_memory: bool = True) -> list[tuple[str, dict]]:
    """(route, body) of every prompt; `seeded`: prompt i asks for seed i; `draft_memory`: whether the requests
    draft from (and add to) the server's draft memory."""
    prompts = load_prompts(args.dataset, args.data_file, args.limit)
    common = {"model": model, "max_tokens": args.max_tokens, "stream": True,
              "temperature": args.temperature if temperature is None else temperature,
              "stream_options": {"include_usage": True},
              "lookahead": {"enabled": lookahead, "draft_memory": draft_memory}}
    chat = DATASETS[args.dataset].chat
    return [("/v1/chat/completions" if chat else "/v1/completions",
             {**common, **({"seed": p.index} if seeded else {}),
              **({"messages": [{"role": "user", "content": p.text}]} if chat else {"prompt": p.text})})
            for p in prompts]


async def soak_request(client, url: str, body: dict, hang_up_after: int | None) -> dict:
    """`stream_request`'s outcome for the soak: "done" with its text, "cut", or "error" (a stream must end with
    exactly one finish reason and one [DONE])."""
    result = await stream_request(client, url, body, hang_up_after)
    if result["error"] is not None:
        return {"outcome": "error", "error": result["error"]}
    if result["cut"]:
        return {"outcome": "cut"}
    if (result["finishes"], result["dones"]) != (1, 1):
        return {"outcome": "error",
                "error": f"the stream ended with {result['finishes']} finish reasons and {result['dones']} [DONE]"}
    return {"outcome": "done", "text": result["text"]}


def metric_samples(page: str):
    """The samples of a Prometheus /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return [sample for family in text_string_to_metric_families(page) for sample in family.samples]


STEP_METRICS = {"lookahead_step_shapes_total": "steps_by_shape", "lookahead_step_cost_milliseconds": "step_cost_ms",
                "lookahead_step_yield_ratio": "step_yield"}


def step_figures(base: str) -> dict[str, dict[str, float]]:
    """The server's step figures by step shape, from its /metrics: batched steps so far, and what its shape
    choice takes each shape to cost (ms) and to yield now."""
    import httpx

    page = httpx.get(f"{base}/metrics", timeout=60).text
    figures: dict[str, dict[str, float]] = {key: {} for key in STEP_METRICS.values()}
    for sample in metric_samples(page):
        if sample.name in STEP_METRICS:
            figures[STEP_METRICS[sample.name]][sample.labels["shape"]] = sample.value
    return figures


def scrape(metrics_text: str) -> dict[str, float]:
    """The soak's server figures from a /metrics page: requests answered 200, resident and device memory."""
    wanted = {("lookahead_requests_total", "200"): "answered", ("process_resident_memory_bytes", None): "rss",
              ("lookahead_device_memory_bytes", None): "device"}
    return {wanted[sample.name, sample.labels.get("status")]: sample.value for sample in metric_samples(metrics_text)
            if (sample.name, sample.labels.get("status")) in wanted}


async def soak(base: str, headers: dict, bodies: list[tuple[str, dict]], concurrency: int, seconds: float,
               disconnect_share: float, interval: float = 10.0) -> dict:
    import httpx

    choices = random.Random(0)
    next_body = itertools.cycle(range(len(bodies)))
    texts: dict[int, set[str]] = {}
    outcomes = {"done": 0, "cut": 0, "error": 0}
    errors: set[str] = set()
    memory: list[dict] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as client:
        async def server_figures() -> dict:
            return scrape((await client.get("/metrics")).text)

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                index = next(next_body)
                hang_up = choices.randint(1, 3) if choices.random() < disconnect_share else None
                result = await soak_request(client, *bodies[index], hang_up)
                outcomes[result["outcome"]] += 1
                if result["outcome"] == "done":
                    texts.setdefault(index, set()).add(result["text"])
                elif result["outcome"] == "error":
                    errors.add(result["error"])

        async def watch(began: float, deadline: float) -> None:
            while time.perf_counter() < deadline:
                memory.append({"seconds": time.perf_counter() - began, **await server_figures()})
                await asyncio.sleep(interval)

        before = await server_figures()
        began = time.perf_counter()
        deadline = began + seconds
        await asyncio.gather(watch(began, deadline), *(worker(deadline) for _ in range(concurrency)))
        wall = time.perf_counter() - began
        await asyncio.sleep(1.0)  # the server counts a request when its response ends
        after = await server_figures()
        memory.append({"seconds": time.perf_counter() - began, **after})
    sent = sum(outcomes.values())
    warm = [sample for sample in memory if sample["seconds"] >= seconds / 5] or memory
    growth = {f"{kind}_growth_mb": (warm[-1][kind] - warm[0][kind]) / 2**20
              for kind in ("rss", "device") if kind in warm[0]}
    return {"concurrency": concurrency, "seconds": wall, "sent": sent, "done": outcomes["done"],
            "cut": outcomes["cut"], "errors": outcomes["error"],
            "error_messages": sorted(errors)[:5], "server_answered": after["answered"] - before.get("answered", 0),
            "bodies_with_differing_answers": sum(len(answers) > 1 for answers in texts.values()),
            "requests_per_second": sent / wall, **growth, "memory": memory}


def served_model(args, headers: dict) -> str:
    import httpx

    return args.model_name or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]


def config_of(args) -> dict:
    return {key: value for key, value in vars(args).items() if key != "func"}


def measure_soak(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = served_model(args, headers)
    bodies = (request_bodies(args, model, True, temperature=0.0)
              + request_bodies(args, model, True, temperature=0.7, seeded=True))
    result = asyncio.run(soak(args.url, headers, bodies, args.concurrency[0], args.soak, args.disconnect_share))
    return {"config": config_of(args), "model": model, "soak": result}


def soak_report(result: dict) -> str:
    s = result["soak"]
    lost = s["sent"] - s["server_answered"]
    lines = [f"soak: {s['seconds']:.0f} s at concurrency {s['concurrency']}: {s['sent']} requests sent, {s['done']} "
             f"answered whole, {s['cut']} hung up on purpose, {s['errors']} errors; the server answered "
             f"{s['server_answered']:.0f} ({'none lost or doubled' if lost == 0 else f'{lost:+.0f} against sent'})",
             f"request bodies with differing answers: {s['bodies_with_differing_answers']}"]
    lines += [f"{kind} memory after warm-up: {s[f'{kind}_growth_mb']:+.1f} MB" for kind in ("rss", "device")
              if f"{kind}_growth_mb" in s]
    lines += [f"error: {message}" for message in s["error_messages"]]
    return "\n".join(lines)


def measure(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = served_model(args, headers)
    settings = []
    for lookahead in (True, False):
        bodies = request_bodies(args, model, lookahead, seeded=True, draft_memory=args.draft_memory)
        warmup = [(route, {**body, "lookahead": {**body["lookahead"], "draft_memory": False}})
                  for route, body in bodies[:args.warmup]]
        for concurrency in args.concurrency:
            if warmup:  # untimed: the server records a step shape's graph the first time it takes it
                asyncio.run(run_setting(args.url, headers, warmup, concurrency))
            before = step_figures(args.url)["steps_by_shape"]
            result = asyncio.run(run_setting(args.url, headers, bodies, concurrency))
            after = step_figures(args.url)
            result["steps_by_shape"] = {shape: steps - before.get(shape, 0)
                                        for shape, steps in after["steps_by_shape"].items()
                                        if steps > before.get(shape, 0)}
            result["step_cost_ms"], result["step_yield"] = after["step_cost_ms"], after["step_yield"]  # at its end
            settings.append({"lookahead": lookahead, **result})
            print(f"lookahead {'on ' if lookahead else 'off'} concurrency {concurrency:3d}: "
                  f"{result['tokens_per_second']:8.1f} tok/s, TTFT p50 {result['ttft_p50']}, "
                  f"TPOT p50 {result['tpot_p50']}, errors {result['errors']}", flush=True)
    # Lookahead is exact: each "on" setting's answers against the same prompts' "off" answers at its concurrency
    # (greedy: the same text, up to the low-precision noise of other batch shapes; sampled: the same seed only).
    texts = {(s["lookahead"], s["concurrency"]): s.pop("texts") for s in settings}
    for setting in settings:
        if setting["lookahead"]:
            pairs = zip(texts[True, setting["concurrency"]], texts[False, setting["concurrency"]])
            setting["same_text_as_off"] = sum(on is not None and on == off for on, off in pairs)
    return {"config": config_of(args), "model": model, "settings": settings}


def same_text(setting: dict) -> str:
    return f"{setting['same_text_as_off']}/{setting['requests']}" if "same_text_as_off" in setting else "-"


def report(result: dict) -> str:
    rows = ["| lookahead | concurrency | tok/s | req/s | TTFT p50 / p95 (ms) | TPOT p50 / p95 (ms) | tokens/step | "
            "same text as off | errors |", "|---|---|---|---|---|---|---|---|---|"]
    ms = lambda value: "-" if value is None else f"{value * 1e3:.1f}"  # noqa: E731
    for s in result["settings"]:
        rows.append(f"| {'on' if s['lookahead'] else 'off'} | {s['concurrency']} | {s['tokens_per_second']:.1f} | "
                    f"{s['requests_per_second']:.2f} | {ms(s['ttft_p50'])} / {ms(s['ttft_p95'])} | "
                    f"{ms(s['tpot_p50'])} / {ms(s['tpot_p95'])} | {s['tokens_per_step']:.2f} | "
                    f"{same_text(s)} | {s['errors']} |")
    return "\n".join(rows)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def soak_plot(result: dict, path: str) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    memory = result["soak"]["memory"]
    for kind, label in (("rss", "resident (host)"), ("device", "device (torch)")):
        if memory and kind in memory[0]:
            axes.plot([m["seconds"] for m in memory], [m[kind] / 2**20 for m in memory], "o-", label=label)
    axes.set(xlabel="seconds into the soak", ylabel="server memory (MiB)")
    axes.legend()
    figure.suptitle(f"lookahead serve soak, concurrency {result['soak']['concurrency']}, {result['model']}")
    figure.tight_layout()
    figure.savefig(path)


def plot(result: dict, path: str) -> None:
    plt = pyplot()

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
    from ..cli.common import non_negative_int, positive_int
    from .cli import int_list

    def concurrency_list(text: str) -> list[int]:
        values = int_list(text)
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f"concurrencies must be positive integers, got {text!r}")
        return values

    def share(text: str) -> float:
        value = float(text)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"a share is between 0 and 1, got {text!r}")
        return value

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
    parser.add_argument("--warmup", type=non_negative_int, default=16, metavar="K",
                        help="before each setting, its first K requests once, untimed (default: 16; 0: none)")
    parser.add_argument("--draft-memory", action="store_true",
                        help="let the sweep's measured requests use the server's draft memory (default: they opt "
                        "out; every setting repeats the same prompts; the soak always uses it)")
    parser.add_argument("--soak", type=positive_int, metavar="SECONDS",
                        help="instead of the sweep: a soak test of this many seconds at the first --concurrency "
                        "(greedy and sampled requests, some hung up on; see above)")
    parser.add_argument("--disconnect-share", type=share, default=0.1, metavar="P",
                        help="with --soak: the share of requests hung up on mid-stream (default: 0.1)")
    parser.add_argument("--out", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG: throughput and TPOT against concurrency "
                        "(with --soak: the server's memory over time)")
    parser.set_defaults(func=run_bench_serve)


def run_bench_serve(args: argparse.Namespace) -> int:
    result = measure_soak(args) if args.soak else measure(args)
    print(soak_report(result) if args.soak else report(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=1)
    if args.plot:
        (soak_plot if args.soak else plot)(result, args.plot)
    return 0
