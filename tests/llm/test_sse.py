"""keel.llm.sse.post_sse against hostile upstreams on 127.0.0.1: bounded lines, events and error bodies, and
failures that name no internal address to the client."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from keel.errors import KeelError, UpstreamError, UpstreamUnavailableError
from keel.llm.http import HttpClient, ProtocolError
from keel.llm.sse import ServerSentEvent, SSEDecoder, post_sse
from keel.settings import UpstreamSettings

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Upstream:
    """Answers every connection with `handler` after reading the request head and body."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.written = 0
        self.done = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            fields = (line.lower().split(b":", 1) for line in head.split(b"\r\n"))
            length = next((int(value[0]) for name, *value in fields if name == b"content-length"), 0)
            await reader.readexactly(length)
            await self.handler(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.done.set()

    async def endless(self, writer: asyncio.StreamWriter, piece: bytes) -> None:
        """Write `piece` as chunks until the client hangs up (at most 256 MiB)."""
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        while self.written < 256 * 1024 * 1024:
            writer.write(chunk)
            await writer.drain()
            self.written += len(piece)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[HttpClient]:
    limits = {"max_sse_line_bytes": 64 * 1024, "max_error_body_bytes": 4096}
    http = HttpClient(UpstreamSettings(https_proxy=None, http_proxy=None, no_proxy="", **limits))
    yield http
    await http.aclose()


async def consume(client: HttpClient, url: str) -> list[ServerSentEvent]:
    events = post_sse(
        client,
        url,
        body=b"{}",
        headers={},
        total=10,
        connect_timeout=2,
        provider="openai",
        model="gpt-x",
        secret="sk-secret-key",
    )
    return [event async for event in events]


@pytest.mark.asyncio
async def test_a_line_that_never_ends_fails_the_call_at_the_bound(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await upstream.endless(writer, b"data: " + b"x" * 4096)  # no newline, ever

    async with Upstream(handler) as upstream:
        with pytest.raises(UpstreamError, match="SSE line longer than 65536 bytes"):
            await consume(client, upstream.url)
        await asyncio.wait_for(upstream.done.wait(), 2)  # the connection was closed, not drained
        assert upstream.written < 8 * 1024 * 1024


@pytest.mark.asyncio
async def test_an_event_that_never_ends_fails_the_call_at_the_bound(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await upstream.endless(writer, b"data: " + b"x" * 1000 + b"\n")  # lines end, the event never does

    async with Upstream(handler) as upstream:
        with pytest.raises(UpstreamError, match="SSE event with more than 65536 characters of data"):
            await consume(client, upstream.url)
        await asyncio.wait_for(upstream.done.wait(), 2)


@pytest.mark.asyncio
async def test_an_endless_error_body_is_read_only_to_the_bound(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n")
        await upstream.endless(writer, b"<html>" + b"overloaded " * 1000)

    async with Upstream(handler) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await consume(client, upstream.url)
        assert caught.value.upstream_status == 500
        assert "answered 500: <html>overloaded" in caught.value.message
        await asyncio.wait_for(upstream.done.wait(), 2)
        assert upstream.written < 8 * 1024 * 1024


@pytest.mark.asyncio
async def test_an_unreachable_upstream_names_no_address_to_the_client(
    client: HttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        caplog.at_level(logging.WARNING, logger="keel.llm.sse"),
        pytest.raises(UpstreamUnavailableError) as caught,
    ):
        await consume(client, f"http://127.0.0.1:{port}/v1/chat/completions")
    error: KeelError = caught.value
    envelope = str(error.envelope())
    assert "openai model 'gpt-x' is unreachable" in envelope
    for internal in ("127.0.0.1", str(port), "Errno", "refused"):
        assert internal not in envelope
    assert f"127.0.0.1:{port}" in caplog.text  # the operator still sees where and why


@pytest.mark.asyncio
async def test_a_connection_cut_mid_stream_names_no_errno_to_the_client(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b'10\r\ndata: {"a": 1}\n\n\r\n')
        await writer.drain()
        writer.transport.abort()

    async with Upstream(handler) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await consume(client, upstream.url)
    assert caught.value.message == "openai model 'gpt-x': the connection failed"


def test_the_decoder_joins_a_long_line_sent_in_many_pieces_once() -> None:
    decoder = SSEDecoder(max_size=10_000)
    line = b"data: " + b"y" * 9000 + b"\n\n"
    events = [event for start in range(0, len(line), 7) for event in decoder.feed(line[start : start + 7])]
    assert events == [ServerSentEvent("message", "y" * 9000)]
    for _ in range(10_000 // 7):
        assert decoder.feed(b"z" * 7) == []
    with pytest.raises(ProtocolError, match="longer than 10000 bytes"):
        decoder.feed(b"z" * 7)
