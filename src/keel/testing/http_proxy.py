"""An HTTP proxy on 127.0.0.1, as an egress-controlled network puts in front of upstreams: CONNECT tunnels
(https) and absolute-form requests (http), with optional Basic credentials. It records what it was asked.

    with HttpProxy() as proxy:                   # or HttpProxy(credentials="user:secret")
        Settings(upstream={"https_proxy": proxy.url})
        ...
        assert proxy.requests == ["CONNECT api.example.com:443 HTTP/1.1"]

It runs its own event loop in a background thread, like the other servers of keel.testing.
"""

from __future__ import annotations

import asyncio
import base64

from keel.testing._background import BackgroundServer
from keel.testing.tcp_proxy import _abort, _pipe

HOST = "127.0.0.1"
_MAX_HEAD = 64 * 1024


class HttpProxy(BackgroundServer):
    thread_name = "http-proxy"

    def __init__(self, *, credentials: str | None = None, refuse: bool = False) -> None:
        super().__init__()
        self.port = 0
        self.requests: list[str] = []  # the request line of every request the proxy read
        self.authorizations: list[str | None] = []  # the Proxy-Authorization of each, if any
        self._expected = (
            None if credentials is None else "Basic " + base64.b64encode(credentials.encode()).decode()
        )
        self._refuse = refuse  # answer every request 403, as a proxy that denies the destination
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                _abort(writer)
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self._open.add(client)
        try:
            await self._handle(reader, client)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away mid-request: nothing to answer
        finally:
            self._open.discard(client)
            _abort(client)

    async def _handle(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEAD:
            return
        lines = head.decode("latin-1").split("\r\n")
        request_line = lines[0]
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        self.requests.append(request_line)
        self.authorizations.append(fields.get("proxy-authorization"))
        method, target, _ = request_line.split(" ", 2)
        if self._refuse:
            await _answer(client, b"403 Forbidden")
            return
        if self._expected is not None and fields.get("proxy-authorization") != self._expected:
            await _answer(client, b"407 Proxy Authentication Required", b"proxy-authenticate: Basic\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream_reader, upstream = await asyncio.open_connection(host.strip("[]"), int(port))
            client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await client.drain()
        else:  # absolute-form: forward the head as it came (an origin server must accept that form)
            authority = target.split("://", 1)[1].split("/", 1)[0]
            host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "80")
            upstream_reader, upstream = await asyncio.open_connection(host, int(port))
            upstream.write(head)
        self._open.add(upstream)
        try:
            await asyncio.gather(_pipe(reader, upstream), _pipe(upstream_reader, client))
        finally:
            self._open.discard(upstream)
            _abort(upstream)


async def _answer(client: asyncio.StreamWriter, status: bytes, extra: bytes = b"") -> None:
    client.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n" + extra + b"\r\n")
    await client.drain()
