"""keel.llm.http against real sockets on 127.0.0.1: servers that send exactly the bytes a test scripts."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from keel.llm.http import ConnectError, ConnectionLost, HttpClient, ProtocolError

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


def _certificate(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
    ]
    command += ["-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return key, cert


@pytest.mark.asyncio
async def test_https_verifies_the_server_and_sends_sni(tmp_path: Path) -> None:
    key, cert = _certificate(tmp_path)
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
