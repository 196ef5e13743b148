"""Server-Sent Events from upstream providers: a fast decoder, and the one streaming POST both make.

`post_sse` owns the HTTP side (status errors, timeouts, connection failures mapped onto `keel.errors`,
the connection closed at once when the caller stops early); providers only translate event payloads.
"""

from __future__ import annotations

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
from keel.llm.http import ConnectError, HttpClient, HTTPError, Response
from keel.telemetry.tracing import inject


@dataclass(slots=True)  # not frozen: a frozen dataclass costs twice as much to build, once per event
class ServerSentEvent:
    event: str  # "message" when the stream named none
    data: str


class SSEDecoder:
    """Bytes in, events out. Lines end in LF or CRLF; comments and `id:`/`retry:` fields are skipped."""

    __slots__ = ("_data", "_event", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._pending:
            chunk = self._pending + chunk
        end = chunk.rfind(b"\n")
        if end < 0:
            self._pending = chunk
            return []
        self._pending = chunk[end + 1 :]
        events: list[ServerSentEvent] = []
        # Decoding once per chunk is safe: b"\n" never occurs inside a multi-byte UTF-8 sequence.
        text = chunk[: end + 1].decode("utf-8", "replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        for line in text[:-1].split("\n"):
            if line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            elif not line:
                if self._data:
                    events.append(ServerSentEvent(self._event or "message", "\n".join(self._data)))
                    self._data = []
                self._event = ""
            elif line.startswith("event:"):
                value = line[6:]
                self._event = value[1:] if value.startswith(" ") else value
            elif line == "data":
                self._data.append("")
        return events

    def flush(self) -> list[ServerSentEvent]:
        """At end of stream: the last event counts even without its blank line."""
        return self.feed(b"\n\n")


async def iter_sse(response: Response) -> AsyncGenerator[ServerSentEvent, None]:
    decoder = SSEDecoder()
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
) -> AsyncGenerator[ServerSentEvent, None]:
    """POST `body` and yield the events of the answer; every failure is a `KeelError`.

    Wrap it in `contextlib.aclosing`: a caller that stops early (client gone, task cancelled) gets the
    connection closed at once instead of drained, so the upstream sees the disconnect and stops
    generating. `secret` (the API key) is scrubbed from upstream error messages.
    """
    response: Response | None = None
    complete = False
    try:
        traced = dict(headers)
        inject(traced)  # W3C traceparent: the upstream call joins the request's trace
        response = await client.request(
            "POST", url, headers=traced, body=body, total=total, connect_timeout=connect_timeout
        )
        if response.status >= 300:
            raise await _status_error(response, provider, model, secret)
        async with aclosing(iter_sse(response)) as events:
            async for event in events:
                yield event
        complete = True
    except TimeoutError as exc:
        raise UpstreamTimeoutError(
            f"{provider} model {model!r} timed out", provider=provider, model=model
        ) from exc
    except ConnectError as exc:
        raise UpstreamUnavailableError(
            f"{provider} model {model!r} is unreachable: {exc}", provider=provider, model=model
        ) from exc
    except HTTPError as exc:
        raise UpstreamError(
            f"{provider} model {model!r} connection failed: {exc}", provider=provider, model=model
        ) from exc
    finally:
        if response is not None:
            if complete:
                response.release()  # read to the end: the connection goes back to the pool
            else:
                response.close()


async def _status_error(response: Response, provider: str, model: str, secret: str | None) -> KeelError:
    message = error_message(await response.read())
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
