"""`GET /metrics`: Prometheus metrics of the server, in its own registry (several apps may share a process).

Per request (observed on the HTTP side): requests by status, time to first token, time per output token. Of the
engine (read from the scheduler when scraped): queue depth, running rows, tokens generated, batched forwards,
tokens committed per row and step, steps by shape, what the shape choice takes each shape to cost and
to yield, and the draft memory's size. Of the process: its memory
(resident and, on CUDA, what torch has allocated on the device), which a soak test watches for leaks.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SchedulerCollector:
    """The scheduler's running totals, read at scrape time (copies taken under the GIL: the engine thread writes)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        stats = self.scheduler.stats
        yield CounterMetricFamily("lookahead_generated_tokens", "Tokens generated, over all requests",
                                  value=stats.new_tokens)
        yield CounterMetricFamily("lookahead_forwards", "Batched forward passes (steps) after the prefills",
                                  value=stats.steps)
        per_row = dict(stats.accepted_histogram)  # tokens a row committed in a step -> row-steps
        largest = max(per_row, default=1)
        buckets, total = [], 0
        for tokens in range(1, largest + 1):
            total += per_row.get(tokens, 0)
            buckets.append((str(float(tokens)), total))
        buckets.append(("+Inf", sum(per_row.values())))
        yield HistogramMetricFamily("lookahead_tokens_per_step", "Tokens each row committed per step",
                                    buckets=buckets, sum_value=sum(k * n for k, n in per_row.items()))
        shapes = CounterMetricFamily("lookahead_step_shapes", "Batched steps by step shape", labels=["shape"])
        for shape, steps in self.scheduler.steps_by_shape.items():
            shapes.add_metric([shape], steps)
        yield shapes
        costs = GaugeMetricFamily("lookahead_step_cost_milliseconds", "What the shape choice takes a step of each "
                                  "shape to cost now (calibrated, or measured in a batch)", labels=["shape"])
        for shape, cost in self.scheduler.step_costs_ms.items():
            costs.add_metric([shape], cost)
        yield costs
        yields = GaugeMetricFamily("lookahead_step_yield_ratio", "Per step shape, tokens beyond one per row that "
                                   "its batched steps delivered over what the rows expected", labels=["shape"])
        for shape, ratio in self.scheduler.step_yields.items():
            yields.add_metric([shape], ratio)
        yield yields


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lookahead_requests", "Completion requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.time_to_first_token = Histogram("lookahead_time_to_first_token_seconds",
                                             "From a request's arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram("lookahead_time_per_output_token_seconds",
                                               "Time per generated token after the first",
                                               buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("lookahead_queue_depth", "Requests waiting for a row", registry=self.registry).set_function(
            lambda: max(engine.queued - engine.running_rows, 0))
        Gauge("lookahead_running_rows", "Rows decoding a request", registry=self.registry).set_function(
            lambda: engine.running_rows)
        self.registry.register(SchedulerCollector(engine.scheduler))
        memory = engine.scheduler.memory
        if memory is not None:
            Gauge("lookahead_draft_memory_requests", "Earlier requests the draft memory holds",
                  registry=self.registry).set_function(lambda: len(memory))
            Gauge("lookahead_draft_memory_tokens", "Tokens of the requests the draft memory holds",
                  registry=self.registry).set_function(lambda: memory.tokens)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and the other process_* series
        device = engine.scheduler.runner.adapter.device
        if device.type == "cuda":
            Gauge("lookahead_device_memory_bytes", "Device memory torch has allocated",
                  registry=self.registry).set_function(lambda: torch.cuda.memory_allocated(device))
