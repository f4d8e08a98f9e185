"""Prometheus metrics of the server, named like vLLM's (``vllm:time_to_first_token_seconds`` ...) under
a ``distillery:`` prefix, so dashboards written for vLLM need only the prefix changed.

Labels: ``model`` (the backend that generated) and ``route`` (``direct`` when a client named the
model, ``student``/``teacher`` when the router chose it). Each app has its own registry, so several
servers (or tests) in one process never share counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

P = "distillery:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so the histograms compare one to one.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
CONFIDENCE_BUCKETS = tuple(i / 20 for i in range(1, 21))

__all__ = ["CONTENT_TYPE_LATEST", "Prices", "ServeMetrics", "Timing"]


@dataclass
class Timing:
    """One generated sequence's timeline in seconds from its request's arrival."""

    queue_s: float | None = None
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    e2e_s: float | None = None


@dataclass(frozen=True)
class Prices:
    """Cost per 1,000 tokens, in whatever currency the operator prices in."""

    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_1k + completion_tokens * self.completion_per_1k) / 1000


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        mr = ["model", "route"]
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token", mr, registry=r,
                              buckets=TTFT_BUCKETS)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between consecutive output tokens", mr,
                             registry=r, buckets=ITL_BUCKETS)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time per output token of a request",
                              mr, registry=r, buckets=ITL_BUCKETS)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency", mr, registry=r,
                             buckets=E2E_BUCKETS)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time a request waited in the batching queue",
                               mr, registry=r, buckets=E2E_BUCKETS)
        self.running = Gauge(P + "num_requests_running", "Sequences in the batch being generated", ["model"],
                             registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Sequences waiting in the queue", ["model"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed", mr, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", mr, registry=r)
        self.success = Counter(P + "request_success", "Finished sequences by finish reason",
                               [*mr, "finished_reason"], registry=r)
        self.http = Counter(P + "http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                            registry=r)
        self.cost = Counter(P + "cost", "Cost of the tokens processed, from the configured per-token prices", mr,
                            registry=r)
        self.request_cost = Summary(P + "request_cost", "Cost of one query (all the models it went through)",
                                    ["route"], registry=r)
        self.routed = Counter(P + "router_requests", "Router decisions: which model answered", ["routed_to", "model"],
                              registry=r)
        self.confidence = Histogram(P + "router_confidence", "Student confidence of routed queries", ["model"],
                                    registry=r, buckets=CONFIDENCE_BUCKETS)
        self.drift = Gauge(P + "drift_psi", "Population stability index of live traffic against the calibration "
                           "set", ["signal"], registry=r)
        self.drift_warnings = Counter(P + "drift_warnings", "Times the drift PSI crossed its warning threshold",
                                      ["signal"], registry=r)
        self.rollout_requests = Counter(P + "rollout_requests", "Routed queries per rollout arm", ["arm", "model"],
                                        registry=r)
        self.rollout_share = Gauge(P + "rollout_share", "Share of router traffic sent to the rollout candidate",
                                   ["candidate"], registry=r)
        self.rollbacks = Counter(P + "rollout_rollbacks", "Automatic returns from a rollout candidate",
                                 ["candidate", "reason"], registry=r)

    def queue_state(self, model: str):
        """A callback for a batcher: sets the waiting/running gauges of ``model``."""
        waiting, running = self.waiting.labels(model), self.running.labels(model)

        def update(n_waiting: int, n_running: int) -> None:
            waiting.set(n_waiting)
            running.set(n_running)

        return update

    def record(self, model: str, route: str, *, prompt_tokens: int, completion_tokens: int, finish_reason: str,
               timing: Timing, prices: Prices) -> float:
        """Count one generated sequence; returns its cost."""
        lab = (model, route)
        self.prompt_tokens.labels(*lab).inc(prompt_tokens)
        self.generation_tokens.labels(*lab).inc(completion_tokens)
        self.success.labels(*lab, finish_reason).inc()
        if timing.queue_s is not None:
            self.queue.labels(*lab).observe(max(timing.queue_s, 0.0))
        if timing.ttft_s is not None:
            self.ttft.labels(*lab).observe(max(timing.ttft_s, 0.0))
        for gap in timing.itl_s:
            self.itl.labels(*lab).observe(gap)
        if timing.itl_s:
            self.tpot.labels(*lab).observe(sum(timing.itl_s) / len(timing.itl_s))
        if timing.e2e_s is not None:
            self.e2e.labels(*lab).observe(timing.e2e_s)
        cost = prices.cost(prompt_tokens, completion_tokens)
        self.cost.labels(*lab).inc(cost)
        return cost

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
