"""A small HTTP/1.1 client for the model call, the hot path: keep-alive pools and streamed bodies.

Why not aiohttp, which Keel used before: on the 2-core CI machine a POST with its streamed answer cost
~340 µs of CPU through aiohttp's `ClientSession` and ~95 µs here (docs/performance.md), the largest
single cost of a proxied request. Parsing is httptools (llhttp, Node.js's parser, which uvicorn already
uses); this module only keeps connections, deadlines and flow control.

It does what provider APIs need: http and https (the system trust store, SNI), Content-Length, chunked
and close-delimited bodies, gzip or deflate when a server compresses anyway, keep-alive with an idle
limit, one retry on a fresh connection when a pooled one turns out closed before any byte of the answer.
Not: proxies, redirects, cookies, HTTP/2; no model API call needs them.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from keel import __version__

USER_AGENT = f"keel/{__version__}"
_HIGH_WATER = 256 * 1024  # buffered body bytes at which reading from the socket pauses
_LOW_WATER = 64 * 1024


class HTTPError(Exception):
    """Base of this module's errors: the request got no (complete) HTTP answer."""


class ConnectError(HTTPError):
    """No connection: refused, unknown host, unreachable, TLS handshake failed."""


class ConnectionLost(HTTPError):
    """The connection closed or broke before the answer was complete."""


class ProtocolError(HTTPError):
    """What the server sent is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]  # scheme, host, port
    path: bytes  # path and query, as sent on the request line
    host_header: bytes


class HttpClient:
    """Connections per origin, reused while idle for at most `keepalive` seconds. One per process."""

    def __init__(self, *, keepalive: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes = b"",
        connect_timeout: float | None = None,
        total: float | None = None,
    ) -> Response:
        """Send the request and wait for the answer's status and headers. `total` bounds the whole
        exchange in seconds, body included: past it, reading raises TimeoutError."""
        if self._closed:
            raise RuntimeError("HttpClient is closed")
        target = self._target(url)
        deadline = None if total is None else time.monotonic() + total
        payload = _request_bytes(method, target, headers, body)
        while True:
            connection = self._checkout(target.origin)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(target.origin, connect_timeout, deadline)
            try:
                await connection.send(payload, deadline)
            except ConnectionLost:
                connection.close()
                if reused and not connection.received:
                    continue  # the server had closed it while it sat idle: it never saw the request
                raise
            except BaseException:  # cancelled (the client left), timed out, malformed: the upstream
                connection.close()  # must see the connection go at once
                raise
            return Response(connection, self)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable():
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, deque()).append(connection)

    def _checkout(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed
            if not connection.closed and now - connection.idle_since < self._keepalive:
                return connection
            connection.close()
        return None

    async def _connect(
        self, origin: tuple[str, str, int], connect_timeout: float | None, deadline: float | None
    ) -> _Connection:
        scheme, host, port = origin
        if deadline is not None:
            left = deadline - time.monotonic()
            connect_timeout = left if connect_timeout is None else min(connect_timeout, left)
        context = None
        if scheme == "https":
            context = self._ssl or _default_ssl_context()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin, loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return connection

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
            default = 443 if parts.scheme == "https" else 80
            port = parts.port or default
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.hostname if port == default else f"{parts.hostname}:{port}"
            if ":" in parts.hostname:  # IPv6 literal
                host = f"[{parts.hostname}]" + ("" if port == default else f":{port}")
            target = _Target((parts.scheme, parts.hostname, port), path.encode(), host.encode())
            if len(self._targets) < 1024:  # a few upstream URLs per process
                self._targets[url] = target
        return target


class Response:
    """The answer: status and headers at once, the body as it arrives. Call `release()` after reading
    it to the end (the connection goes back to the pool) or `close()` to abandon it."""

    __slots__ = ("_client", "_connection", "headers", "status")

    def __init__(self, connection: _Connection, client: HttpClient) -> None:
        self._connection = connection
        self._client = client
        self.status = connection.status
        self.headers = connection.headers

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            chunk = await connection.next_chunk()
            if chunk is None:
                return
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        self._client._release(self._connection)

    def close(self) -> None:
        self._connection.close()


def _request_bytes(method: str, target: _Target, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [
        f"{method} ".encode() + target.path + b" HTTP/1.1",
        b"host: " + target.host_header,
        b"content-length: " + str(len(body)).encode(),
    ]
    agent = True
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lower = name.lower()
        if lower in ("host", "content-length"):
            continue
        if lower == "user-agent":
            agent = False
        lines.append(f"{name}: {value}".encode("latin-1"))
    if agent:
        lines.append(b"user-agent: " + USER_AGENT.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_SSL_CONTEXT: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT  # built on first https use: loading the trust store takes milliseconds
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the one response being read from it."""

    def __init__(self, origin: tuple[str, str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.origin = origin
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received = False  # any byte of the current answer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._parser = httptools.HttpResponseParser(self)
        self._header_name = ""
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._headers_done = False
        self._complete = False
        self._until_close = False  # neither Content-Length nor chunked: the body ends with the connection
        self._keep_alive = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._decoder: zlib._Decompress | None = None

    # -- the request ----------------------------------------------------------------------------

    async def send(self, payload: bytes, deadline: float | None) -> None:
        """Write the request and wait for the status line and headers."""
        self._reset()
        if deadline is not None:
            left = deadline - time.monotonic()
            self._timer = self._loop.call_later(max(0.0, left), self._expire)
        if self.closed or self._transport is None:
            raise ConnectionLost("the connection was closed")
        self._transport.write(payload)
        while not self._headers_done:
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        while not self._chunks:
            if self._complete:
                self._stop_timer()
                return None
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _LOW_WATER and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return (
            not self.closed
            and self._complete
            and not self._until_close
            and self._error is None
            and self._keep_alive
        )

    def close(self) -> None:
        self._stop_timer()
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()  # at once: an abandoned stream must stop the upstream now

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.received = False
        self.status = 0
        self.headers = {}
        self._chunks.clear()
        self._buffered = 0
        self._headers_done = self._complete = self._until_close = self._keep_alive = False
        self._error = None
        self._decoder = None

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._stop_timer()
        self._wake()

    def _expire(self) -> None:
        self._timer = None
        self._fail(TimeoutError("the upstream answer did not complete in time"))
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP answer: {exc}"))
            self.close()
            return
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and self._until_close and not self._complete:
            self._finish_body()
            self._complete = True
            self._wake()
            return
        if not self._complete:
            self._fail(ConnectionLost(f"the connection closed before the answer was complete ({exc})"))

    # -- httptools callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self.headers.get(key)
        self.headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = {}
            return
        self._headers_done = True
        headers = self.headers
        self._until_close = "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", ""
        )
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(ProtocolError(f"undecodable {self.headers.get('content-encoding')} body: {exc}"))
                return
            if not body:
                return
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if not self._headers_done:
            return  # the end of an interim answer
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message is done
        self._finish_body()
        self._complete = True

    def _finish_body(self) -> None:
        if self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
            self._decoder = None
