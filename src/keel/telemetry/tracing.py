"""OpenTelemetry tracing: one trace per request, a span per stage, GenAI client spans per model attempt.

Each app has its own TracerProvider (no global state: tests run several apps in one process). Spans are
exported over OTLP/HTTP when `otlp_endpoint` is set; without it no span is built at all (UnexportedTracer),
yet every request still has a trace id, which the audit record, the logs and the upstream call carry.

A client's `traceparent` sets the trace id and the parent, never the sampling decision: a request that
joins a client's trace is sampled at `trace_sample_ratio` by a random draw (a ratio on the trace id would
let the client pick an id that is always sampled). With `trace_content`, message content on spans passes
the audit redactor, cut at `SPAN_CONTENT_MAX_CHARS`, in the exporter's thread.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
    _Links,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util._decorator import _agnosticcontextmanager
from opentelemetry.util.types import Attributes

from keel import __version__
from keel.settings import Settings
from keel.telemetry.redact import Redactor

SPAN_CONTENT_ATTRIBUTES = ("gen_ai.input.messages", "gen_ai.output.messages")
SPAN_CONTENT_MAX_CHARS = 16_384

_PROPAGATOR = TraceContextTextMapPropagator()
# perf_counter() is what the model layer stamps; spans want epoch nanoseconds.
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def perf_to_ns(perf: float) -> int:
    return _EPOCH_OFFSET_NS + int(perf * 1e9)


class Tracing:
    def __init__(self, settings: Settings) -> None:
        self.provider: TracerProvider | None = None
        self.tracer: Tracer
        self.content = settings.trace_content
        if not settings.otlp_endpoint:
            self.tracer = UnexportedTracer(settings.trace_sample_ratio)
            return
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "keel", "service.version": __version__}),
            sampler=sampler(settings.trace_sample_ratio),
        )
        exporter: SpanExporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint.rstrip("/") + "/v1/traces")
        if settings.trace_content:
            exporter = RedactingExporter(exporter, Redactor(settings.redact_patterns))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("keel", __version__)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what is batched


def sampler(ratio: float) -> Sampler:
    """Our own roots by their (random) trace id; a client's trace by a draw of our own, whatever it says."""
    remote = RandomRatio(ratio)
    return ParentBased(
        TraceIdRatioBased(ratio), remote_parent_sampled=remote, remote_parent_not_sampled=remote
    )


class RandomRatio(Sampler):
    """Samples `ratio` of the calls by a random draw: nothing the caller sends can raise it."""

    def __init__(self, ratio: float) -> None:
        self._ratio = ratio

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        sampled = self._ratio >= 1.0 or random.random() < self._ratio
        decision = Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(decision, attributes if sampled else None, parent.trace_state)

    def get_description(self) -> str:
        return f"RandomRatio{{{self._ratio}}}"


class RedactingExporter(SpanExporter):
    """Message content on spans through the redactor, in the batch processor's thread (off the loop)."""

    def __init__(self, inner: SpanExporter, redactor: Redactor) -> None:
        self._inner = inner
        self._redactor = redactor

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export([self._redacted(span) for span in spans])

    def _redacted(self, span: ReadableSpan) -> ReadableSpan:
        attributes = dict(span.attributes or {})
        if not any(isinstance(attributes.get(name), str) for name in SPAN_CONTENT_ATTRIBUTES):
            return span
        for name in SPAN_CONTENT_ATTRIBUTES:
            value = attributes.get(name)
            if isinstance(value, str):
                attributes[name] = self._redactor.text(value, max_chars=SPAN_CONTENT_MAX_CHARS)
        return ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes=attributes,
            events=span.events,
            links=span.links,
            kind=span.kind,
            status=span.status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class UnexportedTracer(Tracer):
    """The tracer when nothing exports: spans carry ids and nothing else.

    Every request still gets its trace (the client's trace id, or a new one; sampled by the configured
    ratio either way) and a span id of its own, which logs, audit records and the upstream's traceparent
    carry. The spans under it are never seen by anyone, so they reuse their parent's context. The SDK would
    build, sample and end ~10 spans per request for nobody (~18 % of a request's CPU when they were
    recorded).
    """

    def __init__(self, ratio: float) -> None:
        self._sampler = TraceIdRatioBased(ratio)
        self._remote = RandomRatio(ratio)
        self._ids = RandomIdGenerator()

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: _Links = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid and not parent.is_remote:
            return NonRecordingSpan(parent)  # a stage of this process's request
        if parent.is_valid:  # the client's traceparent: join its trace, but sample by our own draw
            trace_id, state = parent.trace_id, parent.trace_state
            sampled = self._remote.should_sample(None, trace_id, name).decision is Decision.RECORD_AND_SAMPLE
            flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        else:
            trace_id, state = self._ids.generate_trace_id(), None
            sampled = self._sampler.should_sample(None, trace_id, name).decision is Decision.RECORD_AND_SAMPLE
            flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        return NonRecordingSpan(
            SpanContext(trace_id, self._ids.generate_span_id(), False, flags, state)  # is_remote=False
        )

    @_agnosticcontextmanager
    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: _Links = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        with trace.use_span(self.start_span(name, context), end_on_exit=end_on_exit) as span:
            yield span


def extract(headers: Mapping[str, str]) -> Context:
    """The client's W3C traceparent, if it sent one."""
    return _PROPAGATOR.extract(headers)


def inject(headers: dict[str, str]) -> None:
    """Propagate the current trace to an upstream HTTP call."""
    _PROPAGATOR.inject(headers)


def trace_id_hex(span: Span | None = None) -> str:
    context = (span or trace.get_current_span()).get_span_context()
    return format(context.trace_id, "032x") if context.trace_id else ""


class stage:  # lower case: used like a function, `with stage(tracer, "auth"):`
    """A stage span that is not made current: safe inside async generators, which may resume elsewhere.

    With `timings`, a stage that succeeds also leaves its duration there, in milliseconds under its name
    (the audit record's `stages`). A class, not an @contextmanager: there are several per request.
    """

    __slots__ = ("_began", "_name", "_span", "_timings")

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        parent: Context | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        self._span = tracer.start_span(name, context=parent)
        self._name = name
        self._timings = timings
        self._began = time.perf_counter()

    def __enter__(self) -> Span:
        return self._span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if kind is not None:
            span.set_status(Status(StatusCode.ERROR, kind.__name__))
            span.set_attribute("error.type", kind.__name__)
        span.end()
        if kind is None and self._timings is not None:
            self._timings[self._name] = round((time.perf_counter() - self._began) * 1000, 3)


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
