"""OpenTelemetry tracing: one trace per request, a span per stage, GenAI client spans per model attempt.

Each app has its own TracerProvider (no global state: tests run several apps in one process). Spans are
exported over OTLP/HTTP when `otlp_endpoint` is set; without it they still give every request a trace id,
which the audit record and the logs carry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from keel import __version__
from keel.settings import Settings

_PROPAGATOR = TraceContextTextMapPropagator()
# perf_counter() is what the model layer stamps; spans want epoch nanoseconds.
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def perf_to_ns(perf: float) -> int:
    return _EPOCH_OFFSET_NS + int(perf * 1e9)


class Tracing:
    def __init__(self, settings: Settings) -> None:
        ratio = TraceIdRatioBased(settings.trace_sample_ratio)
        if settings.otlp_endpoint:
            sampler = ParentBased(ratio)
        else:
            # Nothing exports, so nothing reads the spans under the request's own span: they are left
            # non-recording (recording them cost ~18% of a request's CPU; docs/performance.md). The request
            # span itself is recorded and sampled as before, so logs, audit records and the upstream's
            # traceparent carry the same trace ids.
            sampler = ParentBased(ratio, local_parent_sampled=ALWAYS_OFF)
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "keel", "service.version": __version__}),
            sampler=sampler,
        )
        if settings.otlp_endpoint:
            exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint.rstrip("/") + "/v1/traces")
            self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self.tracer: Tracer = self.provider.get_tracer("keel", __version__)
        self.content = settings.trace_content

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is batched


def extract(headers: Mapping[str, str]) -> Context:
    """The client's W3C traceparent, if it sent one."""
    return _PROPAGATOR.extract(headers)


def inject(headers: dict[str, str]) -> None:
    """Propagate the current trace to an upstream HTTP call."""
    _PROPAGATOR.inject(headers)


def trace_id_hex(span: Span | None = None) -> str:
    context = (span or trace.get_current_span()).get_span_context()
    return format(context.trace_id, "032x") if context.trace_id else ""


@contextmanager
def stage(tracer: Tracer, name: str, parent: Context | None = None, **attributes: Any) -> Iterator[Span]:
    """A stage span that is not made current: safe inside async generators, which may resume elsewhere."""
    span = tracer.start_span(name, context=parent, attributes=attributes or None)
    try:
        yield span
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.set_attribute("error.type", type(exc).__name__)
        raise
    finally:
        span.end()


def record_span(
    tracer: Tracer,
    name: str,
    parent: Context | None,
    start_perf: float,
    end_perf: float,
    attributes: dict[str, Any],
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    error: str | None = None,
) -> None:
    """A span for something already finished (a model attempt), with its real start and end."""
    span = tracer.start_span(
        name,
        context=parent,
        kind=kind,
        start_time=perf_to_ns(start_perf),
        attributes={k: v for k, v in attributes.items() if v is not None},
    )
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=perf_to_ns(end_perf))
