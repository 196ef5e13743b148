"""keel.llm.http through an HTTP proxy (keel.testing.HttpProxy) and with a CA bundle per call, against
TLS and plain servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from keel.errors import UpstreamUnavailableError
from keel.llm.events import ChatEvent, ChatRequest, Finish, TextDelta
from keel.llm.http import ConnectError, HttpClient, NoProxy
from keel.llm.openai_compat import OpenAIChatModel
from keel.settings import ModelConfig, UpstreamSettings
from keel.testing import HttpProxy

SSE = (
    b'data: {"choices": [{"delta": {"content": "through"}, "finish_reason": null}]}\n\n'
    b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
)


class Origin:
    """An upstream that answers every request with a server-sent event stream; http or https."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []  # request heads
        self.server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self, tls: ssl.SSLContext | None = None) -> Origin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                fields = (line.lower().split(b":", 1) for line in head.split(b"\r\n"))
                await reader.readexactly(next((int(v[0]) for n, *v in fields if n == b"content-length"), 0))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(SSE), SSE))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def stop(self) -> None:
        """Close the connections still open too: a client's close may still be on its way through the
        proxy's thread, and the loop ends with the test."""
        assert self.server is not None
        self.server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0)  # connection_lost runs


@pytest_asyncio.fixture
async def tls_origin(certificate: tuple[Path, Path]) -> AsyncIterator[Origin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate[1], certificate[0])
    origin = await Origin().start(context)
    yield origin
    await origin.stop()


@pytest_asyncio.fixture
async def plain_origin() -> AsyncIterator[Origin]:
    origin = await Origin().start()
    yield origin
    await origin.stop()


@pytest.fixture
def proxy() -> Iterator[HttpProxy]:
    with HttpProxy() as running:
        yield running


def through(https: str | None = None, http: str | None = None, no_proxy: str = "") -> HttpClient:
    return HttpClient(UpstreamSettings(https_proxy=https, http_proxy=http, no_proxy=no_proxy))


async def fetch(client: HttpClient, url: str, ca_bundle: Path | None = None) -> bytes:
    response = await client.request(
        "POST", url, headers={}, body=b"{}", total=5, ca_bundle=None if ca_bundle is None else str(ca_bundle)
    )
    body = await response.read()
    response.release()
    return body


@pytest.mark.asyncio
async def test_https_goes_through_a_connect_tunnel_and_verifies_the_origin(
    proxy: HttpProxy, tls_origin: Origin, certificate: tuple[Path, Path]
) -> None:
    client = through(https=proxy.url)
    url = f"https://localhost:{tls_origin.port}/v1/chat/completions"
    assert await fetch(client, url, certificate[1]) == SSE
    assert await fetch(client, url, certificate[1]) == SSE  # the tunnel is kept alive and reused
    assert proxy.requests == [f"CONNECT localhost:{tls_origin.port} HTTP/1.1"]
    assert tls_origin.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")  # origin-form
    with pytest.raises(ConnectError):  # through the tunnel too, the system store does not know it
        await fetch(client, url)
    await client.aclose()


@pytest.mark.asyncio
async def test_proxy_credentials_from_the_url_are_sent_and_a_refusal_is_a_connect_error(
    tls_origin: Origin, certificate: tuple[Path, Path]
) -> None:
    url = f"https://localhost:{tls_origin.port}/v1/x"
    with HttpProxy(credentials="keel:p@ss") as proxy:
        client = through(https=f"http://keel:p%40ss@127.0.0.1:{proxy.port}")
        assert await fetch(client, url, certificate[1]) == SSE
        assert proxy.authorizations == ["Basic a2VlbDpwQHNz"]  # base64 of keel:p@ss
        await client.aclose()
        client = through(https=proxy.url)  # no credentials
        with pytest.raises(ConnectError, match="407"):
            await fetch(client, url, certificate[1])
        await client.aclose()
    with HttpProxy(refuse=True) as proxy:
        client = through(https=proxy.url)
        with pytest.raises(ConnectError, match=r"refused CONNECT: HTTP/1\.1 403"):
            await fetch(client, url, certificate[1])
        await client.aclose()
    assert tls_origin.requests == [tls_origin.requests[0]]  # only the authorised call reached it


@pytest.mark.asyncio
async def test_http_goes_to_the_proxy_in_absolute_form(proxy: HttpProxy, plain_origin: Origin) -> None:
    client = through(http=f"127.0.0.1:{proxy.port}")  # no scheme: http://, as curl reads it
    url = f"http://127.0.0.1:{plain_origin.port}/v1/x?a=1"
    assert await fetch(client, url) == SSE
    assert proxy.requests == [f"POST {url} HTTP/1.1"]
    await client.aclose()


@pytest.mark.asyncio
async def test_no_proxy_hosts_are_reached_directly(proxy: HttpProxy, plain_origin: Origin) -> None:
    client = through(https=proxy.url, http=proxy.url, no_proxy="example.com, 127.0.0.0/8")
    assert await fetch(client, f"http://127.0.0.1:{plain_origin.port}/v1/x") == SSE
    assert proxy.requests == []
    assert plain_origin.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
    await client.aclose()


def test_no_proxy_rules_read_as_curl_reads_them() -> None:
    rules = NoProxy(".internal.example, api.local:8443, 10.0.0.0/8, ::1, [fd00::1]:443")
    assert rules.bypasses("internal.example", 443)
    assert rules.bypasses("a.b.internal.example", 80)
    assert not rules.bypasses("notinternal.example", 443)
    assert rules.bypasses("api.local", 8443) and not rules.bypasses("api.local", 443)
    assert rules.bypasses("10.1.2.3", 443) and not rules.bypasses("11.1.2.3", 443)
    assert rules.bypasses("::1", 8000)
    assert rules.bypasses("fd00::1", 443) and not rules.bypasses("fd00::1", 80)
    assert NoProxy("*").bypasses("anything", 1)
    assert not NoProxy("").bypasses("localhost", 80)


async def ask(model: OpenAIChatModel) -> list[ChatEvent]:
    return [event async for event in model.stream(ChatRequest("gpt", [{"role": "user", "content": "hi"}]))]


@pytest.mark.asyncio
async def test_a_model_alias_trusts_its_ca_bundle(tls_origin: Origin, certificate: tuple[Path, Path]) -> None:
    client = HttpClient()
    base = f"https://localhost:{tls_origin.port}/v1"
    config = ModelConfig(provider="openai", base_url=base, ca_bundle=certificate[1])
    assert await ask(OpenAIChatModel("gpt", config, client)) == [TextDelta("through"), Finish("stop")]
    default = OpenAIChatModel("gpt", ModelConfig(provider="openai", base_url=base), client)
    with pytest.raises(UpstreamUnavailableError, match="unreachable"):  # the system store: refused
        await ask(default)
    assert len(tls_origin.requests) == 1
    await client.aclose()
