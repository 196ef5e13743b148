"""A real OTLP/HTTP trace receiver on 127.0.0.1: what an OpenTelemetry collector sees of Keel's spans.

It runs its own event loop in a background thread (like `FakeUpstream`), accepts `POST /v1/traces` in
the protobuf encoding the OTel exporter sends (gzip-compressed or not), and keeps every span as a plain
`ReceivedSpan`. Point Keel at it with `otlp_endpoint=receiver.endpoint`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # protobuf ships no stubs
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from keel.testing._background import BackgroundServer

HOST = "127.0.0.1"
PROTOBUF = "application/x-protobuf"

Value = str | int | float | bool | bytes | list[Any] | dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: str  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER"
    attributes: dict[str, Value]
    status_code: str  # "UNSET", "OK", "ERROR"
    status_message: str
    start_ns: int  # unix nanoseconds
    end_ns: int
    resource: dict[str, Value]
    scope: str  # the instrumentation scope (tracer) name


def _value(value: AnyValue) -> Value:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if which is None:
        return None
    plain: Value = getattr(value, which)
    return plain


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, Value]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _spans(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        attributes=_attributes(span.attributes),
                        status_code=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                        status_message=span.status.message,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


class OtlpReceiver(BackgroundServer):
    thread_name = "otlp-receiver"

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        self.port = port
        self.exports = 0  # export requests accepted
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """What Keel's `otlp_endpoint` takes; the exporter appends /v1/traces."""
        return f"http://{HOST}:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order (a copy)."""
        with self._changed:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Block until `predicate(spans so far)` holds and return those spans; TimeoutError otherwise.

        Exporters batch: a request's spans may arrive over several exports, a second or more after it ends.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({span.name for span in self._spans})
                    raise TimeoutError(f"no matching spans after {timeout}s; received: {names}")
                self._changed.wait(left)
            return list(self._spans)

    def reset(self) -> None:
        with self._changed:
            self._spans.clear()
            self.exports = 0

    # -- lifecycle

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, HOST, self.port).start()
        self.port = runner.addresses[0][1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _traces(self, request: web.Request) -> web.Response:
        if request.content_type != PROTOBUF:
            return web.Response(status=415, text=f"expected {PROTOBUF}, got {request.content_type}")
        try:
            # aiohttp undoes the Content-Encoding (gzip, deflate) that the exporter may apply.
            export = ExportTraceServiceRequest.FromString(await request.read())
        except DecodeError as exc:
            return web.Response(status=400, text=f"undecodable export: {exc}")
        spans = _spans(export)
        with self._changed:
            self._spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF)
