"""A TCP proxy on 127.0.0.1 that can cut the line on command: a database (or any server) outage for tests.

Put it between a client and a server (`TcpProxy("127.0.0.1", 5432)`, then connect to `proxy.port`).
`cut()` closes every open connection and refuses new ones (accepted, then closed at once, so clients fail
fast instead of hanging); `restore()` lets connections through again. It runs its own event loop in a
background thread, so it works under sync code, async code and benchmarks alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from keel.testing._background import BackgroundServer

HOST = "127.0.0.1"
_CHUNK = 64 * 1024

T = TypeVar("T")


class TcpProxy(BackgroundServer):
    thread_name = "tcp-proxy"

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        super().__init__()
        self.target = (target_host, target_port)
        self.port = port
        self.refused = 0  # connections turned away while cut
        self._cut = False
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def connections(self) -> int:
        """Client connections open through the proxy now."""
        return self._run(self._count())

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until `restore()`."""
        self._run(self._cut_all())

    def restore(self) -> None:
        self._run(self._restore())

    # -- lifecycle

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._cut_all()
            self._cut = False
            await self._server.wait_closed()
            self._server = None

    async def _count(self) -> int:
        return len(self._open) // 2  # a client and a server side each

    async def _restore(self) -> None:
        self._cut = False

    async def _cut_all(self) -> None:
        self._cut = True
        for writer in list(self._open):
            _abort(writer)
        self._open.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            _abort(client)
            return
        try:
            server_reader, server = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(client)
            return
        if self._cut:  # cut while connecting
            _abort(client)
            _abort(server)
            return
        self._open |= {client, server}
        try:
            await asyncio.gather(_pipe(client_reader, server), _pipe(server_reader, client))
        finally:
            self._open -= {client, server}
            _abort(client)
            _abort(server)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF; then half-close, as the peer did."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once (RST, no lingering): what a client sees when the network or the server goes away."""
    with contextlib.suppress(Exception):
        writer.transport.abort()
