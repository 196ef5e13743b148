"""keel.llm.http against real sockets on 127.0.0.1: servers that send exactly the bytes a test scripts."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from keel.llm.http import ConnectError, ConnectionLost, HttpClient, ProtocolError
from keel.settings import UpstreamSettings

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A TCP server whose handler writes raw HTTP; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def url(self, path: str = "/v1/x", scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()
            self.closed.set()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient()
    yield http
    await http.aclose()


async def serve(handler: Handler) -> Scripted:
    return await Scripted(handler).start()


def answer(body: bytes, *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"content-length: " + str(len(body)).encode(), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.mark.asyncio
async def test_keep_alive_reuses_one_connection(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            writer.write(answer(b'{"ok": true}', b"content-type: application/json"))
            await writer.drain()

    server = await serve(handler)
    for _ in range(3):
        response = await client.request("POST", server.url(), headers={"X-A": "1"}, body=b"{}")
        assert response.status == 200
        assert response.headers["content-type"] == "application/json"
        assert await response.read() == b'{"ok": true}'
        response.release()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{server.port}".encode() in first
    assert b"X-A: 1\r\n" in first
    assert b"content-length: 2\r\n" in first
    assert first.endswith(b"\r\n\r\n{}")
    await server.stop()


@pytest.mark.asyncio
async def test_chunked_body_streams_as_it_arrives(client: HttpClient) -> None:
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await go_on.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await server.read_request(reader)

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"first"  # before the server sent the rest
    go_on.set()
    assert [chunk async for chunk in chunks] == [b"second"]
    response.release()
    await server.stop()


@pytest.mark.asyncio
async def test_a_body_that_ends_with_the_connection(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n")
        await writer.drain()

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    assert await response.read() == b"data: 1\n\ndata: 2\n\n"
    response.release()  # not reusable: closed, not pooled
    response = await client.request("POST", server.url(), headers={})
    assert await response.read() == b"data: 1\n\ndata: 2\n\n"
    response.release()
    assert server.connections == 2
    await server.stop()


@pytest.mark.asyncio
async def test_gzip_is_decoded_even_though_it_was_not_asked_for(client: HttpClient) -> None:
    text = b"data: " + b"x" * 5000 + b"\n\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await server.read_request(reader)
        assert request is not None and b"accept-encoding" not in request.lower()
        writer.write(answer(gzip.compress(text), b"content-encoding: gzip"))
        await writer.drain()
        await server.read_request(reader)

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    assert await response.read() == text
    response.release()
    await server.stop()


@pytest.mark.asyncio
async def test_a_pooled_connection_the_server_closed_is_replaced_without_an_error(
    client: HttpClient,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"one"))  # keep-alive by default, then closed by the server while idle
        await writer.drain()

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    assert await response.read() == b"one"
    response.release()
    await server.closed.wait()
    await asyncio.sleep(0.05)  # the FIN may or may not have been seen: both paths must work
    response = await client.request("POST", server.url(), headers={})
    assert await response.read() == b"one"
    response.release()
    assert server.connections == 2
    assert len(server.requests) == 2  # no request was sent twice
    await server.stop()


@pytest.mark.asyncio
async def test_connection_refused_is_a_connect_error(client: HttpClient) -> None:
    server = await serve(lambda reader, writer: asyncio.sleep(0))
    url = server.url()
    await server.stop()
    with pytest.raises(ConnectError):
        await client.request("POST", url, headers={})


@pytest.mark.asyncio
async def test_the_total_time_bounds_the_body_too(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    server = await serve(handler)
    started = time.monotonic()
    response = await client.request("POST", server.url(), headers={}, total=0.3)
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"hi"
    with pytest.raises(TimeoutError):
        await anext(chunks)
    assert time.monotonic() - started < 2
    response.close()
    await server.stop()


@pytest.mark.asyncio
async def test_a_connection_cut_mid_body_is_connection_lost(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    with pytest.raises(ConnectionLost):
        await response.read()
    response.close()
    await server.stop()


@pytest.mark.asyncio
async def test_bytes_that_are_not_http_are_a_protocol_error(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    server = await serve(handler)
    with pytest.raises(ProtocolError):
        await client.request("POST", server.url(), headers={})
    await server.stop()


@pytest.mark.asyncio
async def test_a_large_body_arrives_whole_past_the_flow_control_marks(client: HttpClient) -> None:
    body = bytes(range(256)) * 16384  # 4 MiB: reading pauses and resumes many times

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(body))
        await writer.drain()
        await server.read_request(reader)

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    received = bytearray()
    async for chunk in response.iter_chunks():
        received += chunk
        await asyncio.sleep(0)  # a consumer slower than the socket
    assert bytes(received) == body
    response.release()
    await server.stop()


@pytest.mark.asyncio
async def test_cancelling_while_waiting_closes_the_connection_at_once(client: HttpClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()  # returns when the client closes its side

    server = await serve(handler)
    waiting = asyncio.create_task(client.request("POST", server.url(), headers={}))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(server.closed.wait(), 1)
    await server.stop()


@pytest.mark.asyncio
async def test_header_values_with_line_breaks_are_refused(client: HttpClient) -> None:
    with pytest.raises(ValueError, match="line break"):
        await client.request("POST", "http://127.0.0.1:9/x", headers={"X-A": "1\r\nX-Injected: 1"})


@pytest.mark.asyncio
async def test_https_verifies_the_server_and_sends_sni(certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, context: names.append(name)  # type: ignore[assignment,func-returns-value]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"secure"))
        await writer.drain()
        await server.read_request(reader)

    server = await Scripted(handler).start(server_context)
    trusting = HttpClient(ssl_context=ssl.create_default_context(cafile=str(cert)))
    response = await trusting.request("POST", server.url(scheme="https", host="localhost"), headers={})
    assert await response.read() == b"secure"
    response.release()
    assert names == ["localhost"]
    await trusting.aclose()
    default = HttpClient()  # the system trust store does not know this certificate
    with pytest.raises(ConnectError):
        await default.request("POST", server.url(scheme="https", host="localhost"), headers={})
    await default.aclose()
    await server.stop()


# -- what a hostile or broken upstream cannot do ------------------------------------------------------


def bounded(**limits: int) -> HttpClient:
    return HttpClient(UpstreamSettings(https_proxy=None, http_proxy=None, no_proxy="", **limits))


async def write_until_closed(
    writer: asyncio.StreamWriter, piece: bytes, limit: int = 64 * 1024 * 1024
) -> int:
    """Write `piece` again and again (an endless answer) until the client closes; the bytes written."""
    sent = 0
    try:
        while sent < limit:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    except (ConnectionError, OSError):
        pass
    return sent


@pytest.mark.asyncio
async def test_an_endless_header_is_a_protocol_error_and_the_connection_goes() -> None:
    written: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-huge: ")
        written.append(await write_until_closed(writer, b"a" * 16384))

    server = await serve(handler)
    client = bounded(max_header_bytes=32 * 1024)
    with pytest.raises(ProtocolError, match="headers exceed 32768 bytes"):
        await client.request("POST", server.url(), headers={})
    await asyncio.wait_for(server.closed.wait(), 2)  # the client hung up: the server stops writing
    assert written[0] < 8 * 1024 * 1024
    await client.aclose()
    await server.stop()


@pytest.mark.asyncio
async def test_too_many_header_fields_are_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await server.read_request(reader)) is not None:
            count = int(request.split(b" ", 2)[1].rsplit(b"/", 1)[1])
            writer.write(answer(b"ok", *(b"x-n: %d" % n for n in range(count - 1))))  # + content-length
            await writer.drain()

    server = await serve(handler)
    client = bounded(max_headers=10)
    response = await client.request("POST", server.url("/10"), headers={})
    assert response.headers["x-n"] == ", ".join(str(n) for n in range(9))  # repeated names joined
    assert await response.read() == b"ok"
    response.release()
    with pytest.raises(ProtocolError, match="more than 10 header fields"):
        await client.request("POST", server.url("/11"), headers={})
    await client.aclose()
    default = HttpClient()
    with pytest.raises(ProtocolError, match="more than 100 header fields"):
        await default.request("POST", server.url("/5000"), headers={})
    await default.aclose()
    await server.stop()


@pytest.mark.asyncio
async def test_an_endless_gzip_body_stops_at_the_decompressed_bound() -> None:
    zeros = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    head = zeros.compress(b"\0" * 1024 * 1024) + zeros.flush(zlib.Z_SYNC_FLUSH)
    piece = zeros.compress(b"\0" * 1024 * 1024) + zeros.flush(zlib.Z_SYNC_FLUSH)  # ~1 KB: 1 MiB of zeros

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(head), head))
        await write_until_closed(writer, b"%x\r\n%s\r\n" % (len(piece), piece))

    server = await serve(handler)
    client = bounded(max_decompressed_bytes=4 * 1024 * 1024)
    received: list[bytes] = []

    async def read_all() -> None:
        async for chunk in response.iter_chunks():
            received.append(chunk)

    response = await client.request("POST", server.url(), headers={})
    with pytest.raises(ProtocolError, match="decompressed body exceeds 4194304 bytes"):
        await read_all()
    assert sum(map(len, received)) <= 4 * 1024 * 1024
    response.close()
    await asyncio.wait_for(server.closed.wait(), 2)
    await client.aclose()
    await server.stop()


@pytest.mark.asyncio
async def test_a_gzip_body_cut_short_is_a_protocol_error_not_a_short_answer(client: HttpClient) -> None:
    whole = gzip.compress(b"data: " + bytes(range(256)) * 64 + b"\n\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(whole[: len(whole) // 2], b"content-encoding: gzip"))
        await writer.drain()
        await server.read_request(reader)

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    assert response.status == 200  # the head was sound: the fault shows where the body is read
    with pytest.raises(ProtocolError, match="ended early"):
        await response.read()
    response.close()
    await server.stop()


@pytest.mark.asyncio
async def test_bytes_after_a_complete_answer_fail_it_and_are_never_merged(client: HttpClient) -> None:
    smuggled = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-injected: 1\r\n\r\nevil!"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            if server.connections == 1:
                writer.write(answer(b"one") + smuggled)  # in the same segment as the answer
            else:
                writer.write(answer(b"two"))
            await writer.drain()

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    with pytest.raises(ProtocolError, match="bytes after the complete answer"):
        await response.read()
    assert "x-injected" not in response.headers
    response.release()  # failed: closed, never pooled
    response = await client.request("POST", server.url(), headers={})
    assert "x-injected" not in response.headers
    assert await response.read() == b"two"
    response.release()
    assert server.connections == 2
    await server.stop()


@pytest.mark.asyncio
async def test_bytes_that_arrive_while_a_connection_is_idle_close_it(client: HttpClient) -> None:
    released = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(answer(b"one"))
            await writer.drain()
            await released.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-injected: 1\r\n\r\nevil")
            await writer.drain()
        else:
            writer.write(answer(b"two"))
            await writer.drain()
        await server.read_request(reader)

    server = await serve(handler)
    response = await client.request("POST", server.url(), headers={})
    assert await response.read() == b"one"
    response.release()
    released.set()
    await asyncio.wait_for(server.closed.wait(), 2)  # the client closed the idle connection
    response = await client.request("POST", server.url(), headers={})
    assert "x-injected" not in response.headers
    assert await response.read() == b"two"
    response.release()
    assert server.connections == 2
    await server.stop()


async def _dropped_after_the_second_request(method: str, client: HttpClient) -> Scripted:
    """The server answers one request, reads the second on the same connection, then drops it without
    a byte of answer (an upstream or load balancer dying mid-generation); later connections answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_connection = server.connections == 1
        while await server.read_request(reader) is not None:
            if first_connection and len(server.requests) == 2:
                writer.transport.abort()
                return
            writer.write(answer(b"ok"))
            await writer.drain()

    server = await serve(handler)
    response = await client.request(method, server.url(), headers={})
    assert await response.read() == b"ok"
    response.release()
    return server


@pytest.mark.asyncio
async def test_a_post_that_was_written_is_never_sent_again(client: HttpClient) -> None:
    server = await _dropped_after_the_second_request("POST", client)
    with pytest.raises(ConnectionLost):
        await client.request("POST", server.url(), headers={}, body=b'{"n": 2}')
    await asyncio.sleep(0.1)
    assert len(server.requests) == 2  # the upstream saw the second POST once: no duplicate generation
    assert server.connections == 1
    await server.stop()


@pytest.mark.asyncio
async def test_a_get_on_a_connection_dropped_before_any_answer_is_sent_again(client: HttpClient) -> None:
    server = await _dropped_after_the_second_request("GET", client)
    response = await client.request("GET", server.url(), headers={})
    assert await response.read() == b"ok"
    response.release()
    assert len(server.requests) == 3 and server.connections == 2
    await server.stop()


@pytest.mark.asyncio
async def test_connections_per_origin_are_capped_and_the_rest_wait_in_line() -> None:
    gate = asyncio.Event()
    busy = 0
    most_busy = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy, most_busy
        while await server.read_request(reader) is not None:
            busy += 1
            most_busy = max(most_busy, busy)
            await gate.wait()
            busy -= 1
            writer.write(answer(b"ok"))
            await writer.drain()

    server = await serve(handler)
    client = bounded(max_connections_per_origin=2)

    async def call() -> bytes:
        response = await client.request("POST", server.url(), headers={}, total=10)
        body = await response.read()
        response.release()
        return body

    calls = [asyncio.create_task(call()) for _ in range(6)]
    await asyncio.sleep(0.2)
    assert (server.connections, len(server.requests)) == (2, 2)  # four wait for a connection
    with pytest.raises(TimeoutError):  # waiting in line counts against the request's deadline
        await client.request("POST", server.url(), headers={}, total=0.2)
    gate.set()
    assert await asyncio.gather(*calls) == [b"ok"] * 6
    assert server.connections == 2 and most_busy == 2 and len(server.requests) == 6
    await client.aclose()
    await server.stop()


@pytest.mark.asyncio
async def test_a_closed_connection_gives_its_place_in_the_cap_to_the_next_caller() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
        await writer.drain()
        await reader.read()

    server = await serve(handler)
    client = bounded(max_connections_per_origin=1)
    first = await client.request("POST", server.url(), headers={})
    waiting = asyncio.create_task(client.request("POST", server.url(), headers={}, total=5))
    await asyncio.sleep(0.1)
    assert not waiting.done() and server.connections == 1
    first.close()  # abandoned mid-body: the slot goes to the caller in line, which opens a new connection
    second = await asyncio.wait_for(waiting, 2)
    assert second.status == 200 and server.connections == 2
    second.close()
    await client.aclose()
    await server.stop()
