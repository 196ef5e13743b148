"""A small HTTP/1.1 client for the model call, the hot path: keep-alive pools and streamed bodies.

Why not aiohttp, which Keel used before: on the 2-core CI machine a POST with its streamed answer cost
~340 µs of CPU through aiohttp's `ClientSession` and ~95 µs here (docs/performance.md), the largest
single cost of a proxied request. Parsing is httptools (llhttp, Node.js's parser, which uvicorn already
uses); this module only keeps connections, deadlines, flow control and the bounds below.

It does what provider APIs need: http and https (the system trust store or a CA bundle per call, SNI),
an http proxy (CONNECT tunnels for https, absolute-form requests for http; `NO_PROXY` rules), Content-Length,
chunked and close-delimited bodies, gzip or deflate when a server compresses anyway, keep-alive with an idle
limit and a cap on connections per origin (callers past it wait in line, within their deadline).

What a hostile or broken upstream cannot do (`UpstreamSettings` holds the numbers): send unbounded headers,
expand a compressed body without bound, or slip bytes after a complete answer into the next one (the
connection is closed and the answer fails). A request is re-sent only when nothing of it was written, or
when it is idempotent and the reused connection closed before any byte of the answer: a POST that was
written is never sent twice. Not: redirects, cookies, HTTP/2; no model API call needs them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools

from keel import __version__
from keel.settings import UpstreamSettings

USER_AGENT = f"keel/{__version__}"
_HIGH_WATER = 256 * 1024  # buffered body bytes at which reading from the socket pauses
_LOW_WATER = 64 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})

Origin = tuple[str, str, int]  # scheme, host, port


class HTTPError(Exception):
    """Base of this module's errors: the request got no (complete) HTTP answer."""


class ConnectError(HTTPError):
    """No connection: refused, unknown host, unreachable, TLS handshake failed, the proxy said no."""


class ConnectionLost(HTTPError):
    """The connection closed or broke before the answer was complete."""


class ProtocolError(HTTPError):
    """What the server sent is not HTTP/1.1, or breaks one of the client's bounds."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An http:// proxy: its address and the Proxy-Authorization header its URL's credentials make."""

    host: str
    port: int
    authorization: bytes  # b"" or b"proxy-authorization: Basic ...\r\n"

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"a proxy must be an http:// URL, not {parts.scheme}://")
        authorization = b""
        if parts.username is not None:
            secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = b"proxy-authorization: Basic " + base64.b64encode(secret) + b"\r\n"
        return cls(parts.hostname, parts.port or 80, authorization)


class NoProxy:
    """`NO_PROXY` as curl reads it: `*`, host names (a name also covers its subdomains, a leading dot
    optional), IP addresses and CIDR blocks, each optionally with `:port`; comma or space separated."""

    def __init__(self, rules: str) -> None:
        self.everything = False
        self._names: list[tuple[str, int | None]] = []
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for rule in rules.replace(",", " ").split():
            if rule == "*":
                self.everything = True
                continue
            host, port = rule.lower(), None
            if host.startswith("[") and "]" in host:  # [v6]:port
                host, _, rest = host[1:].partition("]")
                port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
            elif host.count(":") == 1:
                host, _, text = host.partition(":")
                port = int(text) if text.isdigit() else None
            try:
                self._networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                self._names.append((host.lstrip(".").lstrip("*.").rstrip("."), port))

    def bypasses(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            return any(address in net and (p is None or p == port) for net, p in self._networks)
        return any(
            (host == name or host.endswith("." + name)) and (p is None or p == port)
            for name, p in self._names
        )


@dataclass(frozen=True, slots=True)
class _Target:
    key: tuple[str, str, int, str | None]  # scheme, host, port, CA bundle: one pool each
    path: bytes  # as sent on the request line: origin-form, or absolute-form through an http proxy
    host_header: bytes
    proxy: Proxy | None  # the proxy connected to (a CONNECT tunnel for https), None for a direct connection
    head_end: bytes  # ends the head: b"\r\n\r\n", with proxy credentials before it through an http proxy
    pool: _Pool


class _Pool:
    """The connections of one origin: idle ones, how many are open (idle, busy or connecting), and the
    callers waiting for one, first come first served. A freed slot or connection is handed to the first
    waiter directly, so a newcomer never overtakes the line."""

    __slots__ = ("idle", "open", "waiters")

    def __init__(self) -> None:
        self.idle: deque[_Connection] = deque()
        self.open = 0
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    def put(self, connection: _Connection) -> None:
        """A reusable connection back: to the first waiter, else idle."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = time.monotonic()
        self.idle.append(connection)

    def free(self) -> None:
        """A connection is gone (or never came): its slot to the first waiter, else one fewer open."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.open -= 1


class HttpClient:
    """Connections per origin, reused while idle for at most `keepalive` seconds. One per process.

    `settings` brings the proxies and the bounds; without it there is no proxy and the bounds are the
    defaults of `UpstreamSettings`."""

    def __init__(
        self,
        settings: UpstreamSettings | None = None,
        *,
        keepalive: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if settings is None:
            settings = UpstreamSettings(https_proxy=None, http_proxy=None, no_proxy="")
        self.settings = settings
        self._keepalive = settings.keepalive_seconds if keepalive is None else keepalive
        self._max_connections = settings.max_connections_per_origin
        self._ssl = ssl_context
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._proxies = {
            scheme: Proxy.parse(url.get_secret_value())
            for scheme, url in (("https", settings.https_proxy), ("http", settings.http_proxy))
            if url is not None
        }
        self._no_proxy = NoProxy(settings.no_proxy)
        self._pools: dict[tuple[str, str, int, str | None], _Pool] = {}
        self._targets: dict[tuple[str, str | None], _Target] = {}
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
        ca_bundle: str | None = None,
    ) -> Response:
        """Send the request and wait for the answer's status and headers. `total` bounds the whole
        exchange in seconds, waiting for a free connection and the body included: past it, reading
        raises TimeoutError. `ca_bundle` (a PEM file) replaces the system trust store for https."""
        if self._closed:
            raise RuntimeError("HttpClient is closed")
        target = self._target(url, ca_bundle)
        deadline = None if total is None else time.monotonic() + total
        payload = _request_bytes(method, target, headers, body)
        pool = target.pool
        while True:
            connection = self._checkout(pool)
            reused = connection is not None
            if connection is None:
                if pool.open < self._max_connections and not pool.waiters:
                    pool.open += 1  # a slot for the connection about to open
                else:
                    connection = await self._wait(pool, deadline)
                    reused = connection is not None
                if connection is None:
                    connection = await self._connect(target, connect_timeout, deadline)
            try:
                await connection.send(payload, deadline)
            except ConnectionLost:
                connection.close()
                if reused and (not connection.written or (method in _IDEMPOTENT and not connection.received)):
                    continue  # closed while it sat idle: nothing was sent, or sending again is harmless
                raise
            except BaseException:  # cancelled (the client left), timed out, malformed: the upstream
                connection.close()  # must see the connection go at once
                raise
            return Response(connection, self)

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().close()

    def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable():
            connection.close()
            return
        connection.in_use = False
        assert connection.pool is not None  # open, so it holds its slot
        connection.pool.put(connection)

    def _checkout(self, pool: _Pool) -> _Connection | None:
        idle = pool.idle
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed
            if not connection.closed and now - connection.idle_since < self._keepalive:
                return connection
            connection.close()
        return None

    async def _wait(self, pool: _Pool, deadline: float | None) -> _Connection | None:
        """In line for a connection of a full pool: a reusable one, or None for a slot to open one."""
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        pool.waiters.append(waiter)
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed over just as we gave up: pass it on
                handed = waiter.result()
                if handed is None:
                    pool.free()
                else:
                    self._release(handed)
            else:
                with contextlib.suppress(ValueError):
                    pool.waiters.remove(waiter)
            raise

    async def _connect(
        self, target: _Target, connect_timeout: float | None, deadline: float | None
    ) -> _Connection:
        """Open a connection on the slot the caller took; it is the connection's from now on."""
        scheme, host, port, ca_bundle = target.key
        if deadline is not None:
            left = deadline - time.monotonic()
            connect_timeout = left if connect_timeout is None else min(connect_timeout, left)
        context = self._context(ca_bundle) if scheme == "https" else None
        loop = asyncio.get_running_loop()
        connection = _Connection(target.pool, self.settings, loop)
        proxy = target.proxy
        try:
            async with asyncio.timeout(connect_timeout):
                if proxy is None:
                    await loop.create_connection(
                        lambda: connection,
                        host,
                        port,
                        ssl=context,
                        server_hostname=host if context is not None else None,
                    )
                elif context is None:  # http through the proxy: absolute-form requests to it
                    await loop.create_connection(lambda: connection, proxy.host, proxy.port)
                else:
                    await _tunnel(connection, proxy, host, port, context, self.settings.max_header_bytes)
        except TimeoutError:
            connection.close()
            raise
        except (OSError, ssl.SSLError) as exc:
            connection.close()
            via = "" if proxy is None else f" through proxy {proxy.host}:{proxy.port}"
            raise ConnectError(f"cannot connect to {host}:{port}{via}: {exc}") from exc
        except BaseException:
            connection.close()
            raise
        return connection

    def _context(self, ca_bundle: str | None) -> ssl.SSLContext:
        if ca_bundle is None:
            return self._ssl or _default_ssl_context()
        context = self._contexts.get(ca_bundle)
        if context is None:
            context = self._contexts[ca_bundle] = ssl.create_default_context(cafile=ca_bundle)
        return context

    def _target(self, url: str, ca_bundle: str | None) -> _Target:
        target = self._targets.get((url, ca_bundle))
        if target is None:
            target = self._parse(url, ca_bundle)
            if len(self._targets) < 1024:  # a few upstream URLs per process
                self._targets[url, ca_bundle] = target
        return target

    def _parse(self, url: str, ca_bundle: str | None) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname if port == default else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:  # IPv6 literal
            host = f"[{parts.hostname}]" + ("" if port == default else f":{port}")
        proxy = self._proxies.get(parts.scheme)
        if proxy is not None and self._no_proxy.bypasses(parts.hostname, port):
            proxy = None
        authorization = b""
        if proxy is not None and parts.scheme == "http":
            path = f"http://{host}{path}"
            authorization = proxy.authorization
        key = (parts.scheme, parts.hostname, port, ca_bundle if parts.scheme == "https" else None)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        head_end = b"\r\n" + authorization + b"\r\n"
        return _Target(key, path.encode(), host.encode(), proxy, head_end, pool)


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

    async def read(self, limit: int | None = None) -> bytes:
        """The body; with `limit`, at most that many bytes, and reading stops there (then `close()`:
        a connection with the rest of an answer unread is not reused)."""
        parts: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            chunk = await self._connection.next_chunk()
            if chunk is None:
                break
            parts.append(chunk)
            size += len(chunk)
        body = b"".join(parts)
        return body if limit is None else body[:limit]

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
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or "\0" in value:
            raise ValueError(f"header {name!r} holds a line break or NUL")
        lower = name.lower()
        if lower in ("host", "content-length", "proxy-authorization"):
            continue
        if lower == "user-agent":
            agent = False
        lines.append(f"{name}: {value}".encode("latin-1"))
    if agent:
        lines.append(b"user-agent: " + USER_AGENT.encode())
    return b"\r\n".join(lines) + target.head_end + body


_SSL_CONTEXT: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT  # built on first https use: loading the trust store takes milliseconds
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


async def _tunnel(
    connection: _Connection, proxy: Proxy, host: str, port: int, context: ssl.SSLContext, max_head: int
) -> None:
    """CONNECT through the proxy, then TLS with the origin inside the tunnel; `connection` gets the
    TLS transport."""
    loop = asyncio.get_running_loop()
    transport, opening = await loop.create_connection(lambda: _Tunnel(loop, max_head), proxy.host, proxy.port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        transport.write(
            f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n".encode() + proxy.authorization + b"\r\n"
        )
        await opening.established
        tls = await loop.start_tls(transport, connection, context, server_hostname=host)
    except BaseException:
        transport.abort()
        raise
    if tls is None:  # the transport closed during the handshake
        raise ConnectionLost(f"the tunnel to {authority} closed during the TLS handshake")
    connection.connection_made(tls)


class _Tunnel(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT: `established` resolves on a 2xx, fails on anything else."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_head: int) -> None:
        self.established: asyncio.Future[None] = loop.create_future()
        self._head = b""
        self._max_head = max_head

    def data_received(self, data: bytes) -> None:
        if self.established.done():
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > self._max_head:
                self.established.set_exception(ConnectError("the proxy's answer to CONNECT is too long"))
            return
        status_line = self._head.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].startswith("2"):
            self.established.set_exception(ConnectError(f"the proxy refused CONNECT: {status_line[:200]}"))
        elif end + 4 != len(self._head):  # the origin speaks second in TLS: these bytes are not its
            self.established.set_exception(ProtocolError("bytes after the proxy's answer to CONNECT"))
        else:
            self.established.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.established.done():
            self.established.set_exception(ConnectError(f"the proxy closed the connection ({exc})"))


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the one response being read from it. It holds a slot of its
    pool from creation until it closes."""

    def __init__(self, pool: _Pool, limits: UpstreamSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.pool: _Pool | None = pool
        self._loop = loop
        self._max_head = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._max_decoded = limits.max_decompressed_bytes
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.in_use = False  # a request was sent and not yet released: bytes from the server expected
        self.idle_since = 0.0
        self.written = False  # any byte of the current request went to the socket
        self.received = False  # any byte of the current answer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._head_bytes = 0
        self._header_count = 0
        self._decoded = 0
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
        if self.closed or self._transport is None or self._transport.is_closing():
            raise ConnectionLost("the connection was closed")  # before a byte of this request was written
        self.in_use = self.written = True
        self._transport.write(payload)
        while not self._headers_done:  # a fault past the headers (in the body) is raised by the read
            if self._error is not None:
                raise self._error
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def next_chunk(self) -> bytes | None:
        while not self._chunks:
            if self._complete:
                self._stop_timer()
                if self._error is not None:
                    raise self._error
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
        self._gone()

    def _gone(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.free()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.written = self.received = False
        self.status = 0
        self.headers = {}
        self._chunks.clear()
        self._buffered = self._head_bytes = self._header_count = self._decoded = 0
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
        if not self.in_use:  # nothing asked: a server that talks out of turn is not reused
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(
                cause if isinstance(cause, HTTPError) else ProtocolError(f"malformed HTTP answer: {exc}")
            )
            self.close()
            return
        if not self._headers_done:  # httptools gathers a header before handing it over: count the bytes
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._fail(ProtocolError(f"the answer's headers exceed {self._max_head} bytes"))
                self.close()
                return
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        ours = self.closed  # closed by this side (abandoned, timed out, failed): no answer to finish
        self.closed = True
        self._gone()
        if not ours and exc is None and self._headers_done and self._until_close and not self._complete:
            self._finish_body()
            self._complete = True
            self._wake()
            return
        if not self._complete:
            self._fail(ConnectionLost(f"the connection closed before the answer was complete ({exc})"))

    # -- httptools callbacks: an exception raised here stops the parser and fails the answer ----------

    def on_message_begin(self) -> None:
        if self._complete:
            raise ProtocolError("bytes after the complete answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._max_headers:
            raise ProtocolError(f"the answer has more than {self._max_headers} header fields")
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
            left = self._max_decoded - self._decoded
            try:
                body = self._decoder.decompress(body, left + 1)  # never more than the bound allows
            except zlib.error as exc:
                raise ProtocolError(
                    f"undecodable {self.headers.get('content-encoding')} body: {exc}"
                ) from exc
            self._decoded += len(body)
            if self._decoded > self._max_decoded:
                raise ProtocolError(f"the decompressed body exceeds {self._max_decoded} bytes")
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
        decoder = self._decoder
        if decoder is not None:
            self._decoder = None
            tail = decoder.flush()
            if tail:
                self._chunks.append(tail)
            if not decoder.eof:
                self._fail(ProtocolError("the compressed body ended early"))
