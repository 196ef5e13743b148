"""Prometheus metrics. One registry per app (tests run several apps in one process); bounded labels only:
no tenant ids, request ids or raw paths."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from keel.llm.trace import Attempt

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A metric's labelled children, looked up once: `labels()` validates and locks on every call, and the
    hot path asks for the same few children on every request. Labels are bounded, so is this."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "keel_http_requests_total", "HTTP requests.", ["route", "method", "status"], registry=r
        )
        self.http_duration = Histogram(
            "keel_http_request_duration_seconds",
            "HTTP request duration.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_requests = Counter(
            "keel_llm_requests_total",
            "Model attempts by outcome.",
            ["model", "provider", "outcome"],
            registry=r,
        )
        self.llm_duration = Histogram(
            "keel_llm_request_duration_seconds",
            "Model attempt duration.",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_ttft = Histogram(
            "keel_llm_time_to_first_token_seconds",
            "Time to the first model event.",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter("keel_llm_tokens_total", "Tokens.", ["model", "direction"], registry=r)
        self.llm_retries = Counter("keel_llm_retries_total", "Retries.", ["model", "reason"], registry=r)
        self.llm_fallbacks = Counter(
            "keel_llm_fallbacks_total", "Fallbacks.", ["from_model", "to_model"], registry=r
        )
        self.context_overflows = Counter(
            "keel_context_overflow_total",
            "Upstream context-length errors (each moves to a larger fallback, if any); rare with trimming.",
            ["model"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "keel_circuit_breaker_state", "0 closed, 1 half-open, 2 open.", ["deployment"], registry=r
        )
        self.rate_limited = Counter(
            "keel_rate_limited_total", "Refused by a tier limit.", ["tier", "kind"], registry=r
        )
        self.overhead = Histogram(
            "keel_gateway_overhead_seconds",
            "Time spent in Keel itself, excluding the upstream.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self._http_requests = Children(self.http_requests)
        self._http_duration = Children(self.http_duration)
        self._llm_requests = Children(self.llm_requests)
        self._llm_duration = Children(self.llm_duration)
        self._llm_ttft = Children(self.llm_ttft)
        self._llm_tokens = Children(self.llm_tokens)
        self.queue_depth = Gauge("keel_write_queue_depth", "Rows waiting to be written.", registry=r)
        self.queue_dropped = Counter(
            "keel_write_queue_dropped_total",
            "Audit rows dropped because the write queue was full.",
            registry=r,
        )

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._http_requests(route, method, str(status)).inc()
        self._http_duration(route).observe(seconds)

    def tokens(self, model: str, input_tokens: int, output_tokens: int) -> None:
        self._llm_tokens(model, "input").inc(input_tokens)
        self._llm_tokens(model, "output").inc(output_tokens)

    # LLMObserver: the resilience layer reports here as things happen.
    def attempt_finished(self, attempt: Attempt) -> None:
        outcome = "success" if attempt.error_type is None else attempt.error_type
        self._llm_requests(attempt.model, attempt.provider, outcome).inc()
        if outcome == "context_length":
            self.context_overflows.labels(attempt.model).inc()
        self._llm_duration(attempt.model, attempt.provider).observe(attempt.latency)
        if attempt.first_token is not None:
            self._llm_ttft(attempt.model, attempt.provider).observe(attempt.first_token)

    def retried(self, model: str, reason: str) -> None:
        self.llm_retries.labels(model, reason).inc()

    def fell_back(self, from_model: str, to_model: str) -> None:
        self.llm_fallbacks.labels(from_model, to_model).inc()

    def breaker_changed(self, deployment: str, state: int) -> None:
        self.breaker_state.labels(deployment).set(state)
