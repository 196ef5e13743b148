"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task per request): request ids, body limit,
one access log line per request, and the hot routes.

Every request gets Keel's own request id (`x-request-id` on the response), unique across tenants. An id the
client sends (`X-Request-Id` or `X-Client-Request-Id`) never replaces it: it is kept as the request's
`client_request_id` (in the audit record, echoed as `x-client-request-id`).

This is the outermost app `keel serve` runs. Hot routes are plain ASGI routes matched here, before the
FastAPI app: its middleware stack and router cost ~10 % of a chat completion's CPU. They answer their
own errors (`gateway.errors.response_for`). A request that only partly matches one (another method) goes
on to the app, which has the same route registered, so it still gets its 405.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time

import orjson
from opentelemetry import context as otel_context
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.errors import PayloadTooLargeError, RequestTimeoutError
from keel.telemetry import request_id_var, tenant_var
from keel.telemetry.metrics import Metrics
from keel.telemetry.tracing import extract

access_log = logging.getLogger("keel.access")

REQUEST_ID_HEADER = b"x-request-id"
CLIENT_REQUEST_ID_HEADER = b"x-client-request-id"
_CLIENT_ID_HEADERS = (REQUEST_ID_HEADER, CLIENT_REQUEST_ID_HEADER)
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _route(scope: Scope) -> str:
    """The route template, never the raw path: metric labels must stay bounded."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def random_hex() -> str:
    """128 random bits as 32 hex digits, for ids that must not collide (not secrets): uuid4 costs a
    system call and an object per id."""
    return f"{random.getrandbits(128):032x}"


def new_request_id() -> str:
    return f"req_{random_hex()}"


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout: float | None = None,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
        hot_routes: list[BaseRoute] | None = None,
    ) -> None:
        self.app = app
        self.hot_routes = hot_routes or []
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.tracer = tracer or NoOpTracer()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = new_request_id()
        client_request_id: str | None = None
        length: int | None = None
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _CLIENT_ID_HEADERS and _SANE_ID.match(value):
                client_request_id = value.decode()
            elif name == b"content-length" and value.isdigit():
                length = int(value)
            elif name in _TRACE_HEADERS:
                carrier[name.decode()] = value.decode("latin-1")
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = client_request_id
        state["received"] = started
        method: str = scope["method"]
        span = self.tracer.start_span(
            f"{method} {scope['path']}",
            context=extract(carrier) if carrier else None,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "keel.request_id": request_id,
            },
        )
        if client_request_id is not None:
            span.set_attribute("keel.client_request_id", client_request_id)
        token = otel_context.attach(set_span_in_context(span))
        request_id_var.set(request_id)
        tenant_var.set(None)
        id_headers = [(REQUEST_ID_HEADER, request_id.encode())]
        if client_request_id is not None:
            id_headers.append((CLIENT_REQUEST_ID_HEADER, client_request_id.encode()))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *id_headers]
            await send(message)

        try:
            if length is not None and length > self.max_body_bytes:
                await self._too_large(send_with_id)
                return
            await self._dispatch(scope, self._limited(receive), send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route(scope)
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            access_log.info(
                "%s %s %d",
                method,
                scope["path"],
                status,
                extra={"status": status, "duration_ms": round(elapsed * 1000, 3)},
            )
            span.end()
            otel_context.detach(token)
            if self.metrics is not None:
                self.metrics.http_request(route, method, status, elapsed)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        for route in self.hot_routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope.update(child)
                scope["route"] = route  # as the router sets it: the metric's route label
                await route.handle(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        """Count a chunked body as it arrives; past the limit the route's body read raises a 413. The whole
        body must arrive within `body_timeout` of the request's start, or the read raises a 408 (uvicorn
        has no body timeout: a client trickling bytes would hold its request open for ever)."""
        seen = 0
        limit = self.max_body_bytes
        timeout = self.body_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        reading = True  # until the last body message; later reads wait for the disconnect, untimed

        async def receive_limited() -> Message:
            nonlocal seen, reading
            if reading and deadline is not None:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeoutError(
                        f"The request body did not arrive within {timeout:g} seconds."
                    ) from None
            else:
                message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large_error(limit)
                reading = message.get("more_body", False)
            return message

        return receive_limited

    async def _too_large(self, send: Send) -> None:
        error = _too_large_error(self.max_body_bytes)
        body = orjson.dumps(error.envelope())
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _too_large_error(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"Request body exceeds the limit of {limit} bytes.")
