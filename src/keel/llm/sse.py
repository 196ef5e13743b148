"""Server-Sent Events from upstream providers: a fast decoder, and the one streaming POST both make.

`post_sse` owns the HTTP side (status errors, timeouts, connection failures mapped onto `keel.errors`,
the connection closed at once when the caller stops early); providers only translate event payloads.
What a client sees of a failed connection names the provider and model, never a host, port or errno:
those go to the log, which carries the request id.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson

from keel.errors import (
    KeelError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    upstream_status_error,
)
from keel.llm.http import ConnectError, HttpClient, HTTPError, ProtocolError, Response
from keel.telemetry.tracing import inject

log = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs twice as much to build, once per event
class ServerSentEvent:
    event: str  # "message" when the stream named none
    data: str


class SSEDecoder:
    """Bytes in, events out. Lines end in LF or CRLF; comments and `id:`/`retry:` fields are skipped.

    A line longer than `max_size` bytes, or an event whose data exceeds it, is a `ProtocolError`: an
    upstream that never ends a line cannot make the buffer grow without bound."""

    __slots__ = ("_data", "_event", "_held", "_max", "_pending", "_size")

    def __init__(self, max_size: int = 1024 * 1024) -> None:
        self._pending: list[bytes] = []  # the start of a line not ended yet
        self._held = 0  # its length
        self._event = ""
        self._data: list[str] = []
        self._size = 0  # characters of data in the current event
        self._max = max_size

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        end = chunk.rfind(b"\n")
        if end < 0:
            self._held += len(chunk)
            if self._held > self._max:
                raise ProtocolError(f"an SSE line longer than {self._max} bytes")
            self._pending.append(chunk)  # joined once the line ends: no copy per piece of a long line
            return []
        pending = self._pending
        if pending:
            end += self._held
            pending.append(chunk)
            chunk = b"".join(pending)
            pending.clear()
            self._held = 0
        if end + 1 < len(chunk):
            self._hold(chunk[end + 1 :])
        events: list[ServerSentEvent] = []
        # Decoding once per chunk is safe: b"\n" never occurs inside a multi-byte UTF-8 sequence.
        text = chunk[: end + 1].decode("utf-8", "replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        data, size = self._data, self._size
        for line in text[:-1].split("\n"):
            if line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
                size += len(value)
            elif not line:
                if data:
                    events.append(ServerSentEvent(self._event or "message", "\n".join(data)))
                    data = self._data = []
                    size = 0
                self._event = ""
            elif line.startswith("event:"):
                value = line[6:]
                self._event = value[1:] if value.startswith(" ") else value
            elif line == "data":
                data.append("")
        self._size = size  # checked per chunk: within one, an event is bounded by the chunk's own size
        if size > self._max:
            raise ProtocolError(f"an SSE event with more than {self._max} characters of data")
        return events

    def flush(self) -> list[ServerSentEvent]:
        """At end of stream: the last event counts even without its blank line."""
        return self.feed(b"\n\n")

    def _hold(self, part: bytes) -> None:
        self._held = len(part)
        if self._held > self._max:
            raise ProtocolError(f"an SSE line longer than {self._max} bytes")
        self._pending.append(part)


async def iter_sse(response: Response, max_size: int = 1024 * 1024) -> AsyncGenerator[ServerSentEvent, None]:
    decoder = SSEDecoder(max_size)
    async for chunk in response.iter_chunks():
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event


async def post_sse(
    client: HttpClient,
    url: str,
    *,
    body: bytes,
    headers: Mapping[str, str],
    total: float,
    connect_timeout: float,
    provider: str,
    model: str,
    secret: str | None,
    ca_bundle: str | None = None,
) -> AsyncGenerator[ServerSentEvent, None]:
    """POST `body` and yield the events of the answer; every failure is a `KeelError`.

    Wrap it in `contextlib.aclosing`: a caller that stops early (client gone, task cancelled) gets the
    connection closed at once instead of drained, so the upstream sees the disconnect and stops
    generating. `secret` (the API key) is scrubbed from upstream error messages. `ca_bundle` (a PEM
    file) replaces the system trust store for this call.
    """
    response: Response | None = None
    complete = False
    limits = client.settings
    try:
        traced = dict(headers)
        inject(traced)  # W3C traceparent: the upstream call joins the request's trace
        response = await client.request(
            "POST",
            url,
            headers=traced,
            body=body,
            total=total,
            connect_timeout=connect_timeout,
            ca_bundle=ca_bundle,
        )
        if response.status >= 300:
            message = error_message(await response.read(limits.max_error_body_bytes))
            raise _status_error(response, message, provider, model, secret)
        async with aclosing(iter_sse(response, limits.max_sse_line_bytes)) as events:
            async for event in events:
                yield event
        complete = True
    except TimeoutError as exc:
        raise UpstreamTimeoutError(
            f"{provider} model {model!r} timed out", provider=provider, model=model
        ) from exc
    except ConnectError as exc:
        log.warning("%s model %r is unreachable: %s", provider, model, exc)
        raise UpstreamUnavailableError(
            f"{provider} model {model!r} is unreachable", provider=provider, model=model
        ) from exc
    except ProtocolError as exc:  # what the upstream sent, in its own words: no address in it
        log.warning("%s model %r sent a malformed answer: %s", provider, model, exc)
        raise UpstreamError(
            f"{provider} model {model!r} sent a malformed answer: {exc}", provider=provider, model=model
        ) from exc
    except HTTPError as exc:
        log.warning("%s model %r: the connection failed: %s", provider, model, exc)
        raise UpstreamError(
            f"{provider} model {model!r}: the connection failed", provider=provider, model=model
        ) from exc
    finally:
        if response is not None:
            if complete:
                response.release()  # read to the end: the connection goes back to the pool
            else:
                response.close()


def _status_error(
    response: Response, message: str, provider: str, model: str, secret: str | None
) -> KeelError:
    if secret:
        message = message.replace(secret, "***")
    return upstream_status_error(
        provider=provider, model=model, status=response.status, message=message, headers=response.headers
    )


def error_message(body: bytes) -> str:
    """The message of an error body: OpenAI and Anthropic both put it at error.message."""
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return body.decode("utf-8", "replace")[:300]
