"""OpenAIChatModel against a real FakeUpstream over real HTTP; the SSE decoder it stands on."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from keel.errors import (
    InvalidRequestError,
    KeelError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from keel.llm.events import ChatEvent, ChatRequest, ChatResult, Finish, TextDelta, ToolCallDelta, Usage
from keel.llm.http import HttpClient
from keel.llm.openai_compat import OpenAIChatModel
from keel.llm.sse import ServerSentEvent, SSEDecoder, error_message
from keel.settings import ModelConfig
from keel.testing import FakeUpstream, Reply

API_KEY = "sk-test-0123456789"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest_asyncio.fixture
async def session() -> AsyncIterator[HttpClient]:
    client = HttpClient()
    yield client
    await client.aclose()


def make_model(session: HttpClient, base_url: str, **config: Any) -> OpenAIChatModel:
    settings = ModelConfig(provider="openai", base_url=base_url, **({"api_key": API_KEY} | config))
    return OpenAIChatModel("gpt-test", settings, session)


async def collect(model: OpenAIChatModel, request: ChatRequest) -> tuple[list[ChatEvent], ChatResult]:
    events = [event async for event in model.stream(request)]
    result = ChatResult()
    for event in events:
        result.add(event)
    return events, result


async def drain(stream: AsyncIterator[ChatEvent], seen: list[ChatEvent]) -> None:
    """Read to the end, keeping what arrived before a failure."""
    async for event in stream:
        seen.append(event)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- streaming


@pytest.mark.asyncio
async def test_text_arrives_as_deltas_then_usage_then_finish(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(text="Hello there", chunks=["Hel", "lo", " there"], input_tokens=9, output_tokens=3))
    model = make_model(session, fake.openai_base_url)

    events, result = await collect(model, ChatRequest(model="gpt-test", messages=HELLO))

    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta(" there"),
        Usage(input_tokens=9, output_tokens=3),
        Finish("stop"),
    ]
    assert (result.text, result.finish_reason, result.usage) == ("Hello there", "stop", Usage(9, 3))
    assert fake.cancelled_streams == 0


@pytest.mark.asyncio
async def test_finish_reason_length_passes_through(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(text="cut", finish_reason="length"))
    _, result = await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))
    assert result.finish_reason == "length"


@pytest.mark.asyncio
async def test_sends_every_set_parameter_and_the_headers(fake: FakeUpstream, session: HttpClient) -> None:
    model = make_model(
        session, fake.openai_base_url, model="gpt-4o-mini", headers={"OpenAI-Organization": "org-1"}
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = ChatRequest(
        model="gpt-test",
        messages=[{"role": "system", "content": "Be brief."}, *HELLO],
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        stop=["END"],
        seed=7,
        user="u-42",
        tools=tools,
        tool_choice="auto",
    )

    await collect(model, request)

    (sent,) = fake.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.body == {
        "model": "gpt-4o-mini",
        "messages": request.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": 7,
        "user": "u-42",
        "tools": tools,
        "tool_choice": "auto",
    }
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["openai-organization"] == "org-1"
    assert sent.headers["content-type"] == "application/json"


@pytest.mark.asyncio
async def test_unset_parameters_are_omitted_and_the_alias_is_the_model(
    fake: FakeUpstream, session: HttpClient
) -> None:
    model = make_model(session, fake.openai_base_url, api_key=None)

    await collect(model, ChatRequest(model="gpt-test", messages=HELLO))

    (sent,) = fake.requests
    assert sent.body == {
        "model": "gpt-test",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "authorization" not in sent.headers


@pytest.mark.asyncio
async def test_configured_max_output_tokens_is_the_default(fake: FakeUpstream, session: HttpClient) -> None:
    model = make_model(session, fake.openai_base_url, max_output_tokens=128)
    await collect(model, ChatRequest(model="gpt-test", messages=HELLO))
    await collect(model, ChatRequest(model="gpt-test", messages=HELLO, max_tokens=5))
    assert [sent.body["max_tokens"] for sent in fake.requests] == [128, 5]


@pytest.mark.asyncio
async def test_api_key_from_the_environment(
    fake: FakeUpstream, session: HttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_TEST_OPENAI_KEY", "sk-from-env")
    model = make_model(session, fake.openai_base_url, api_key=None, api_key_env="KEEL_TEST_OPENAI_KEY")
    await collect(model, ChatRequest(model="gpt-test", messages=HELLO))
    assert fake.requests[0].headers["authorization"] == "Bearer sk-from-env"


# -- tools


@pytest.mark.asyncio
async def test_tool_calls_stream_as_deltas_and_collect(fake: FakeUpstream, session: HttpClient) -> None:
    arguments = '{"city": "Paris", "unit": "celsius", "days": 3}'
    fake.enqueue(
        Reply(
            text="",
            tool_calls=[
                {"id": "call_1", "name": "weather", "arguments": arguments},
                {"id": "call_2", "name": "time", "arguments": "{}"},
            ],
        )
    )

    events, result = await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))

    deltas = [event for event in events if isinstance(event, ToolCallDelta)]
    assert deltas[0] == ToolCallDelta(index=0, id="call_1", name="weather", arguments="")
    assert len(deltas) > 3  # the arguments came in several pieces
    assert result.text == ""
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls == [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": arguments}},
        {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]


@pytest.mark.asyncio
async def test_tool_results_are_sent_as_given(fake: FakeUpstream, session: HttpClient) -> None:
    messages = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", messages))
    assert fake.requests[0].body["messages"] == messages


# -- errors


@pytest.mark.parametrize(
    ("status", "error_type", "upstream_status"),
    [
        (400, InvalidRequestError, None),
        (401, UpstreamError, 401),
        (500, UpstreamError, 500),
        (503, UpstreamUnavailableError, 503),
        (529, UpstreamUnavailableError, 529),
    ],
)
@pytest.mark.asyncio
async def test_error_statuses_map_onto_the_taxonomy(
    fake: FakeUpstream,
    session: HttpClient,
    status: int,
    error_type: type[KeelError],
    upstream_status: int | None,
) -> None:
    fake.enqueue(Reply(status=status, error_message=f"scripted failure {status}"))

    with pytest.raises(error_type) as caught:
        await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))

    assert type(caught.value) is error_type
    assert f"scripted failure {status}" in caught.value.message
    assert getattr(caught.value, "upstream_status", None) == upstream_status


@pytest.mark.asyncio
async def test_429_keeps_retry_after(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(status=429, error_message="slow down", headers={"Retry-After": "7"}))
    with pytest.raises(RateLimitError) as caught:
        await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))
    assert caught.value.headers == {"Retry-After": "7"}
    assert "slow down" in caught.value.message


@pytest.mark.asyncio
async def test_api_key_never_appears_in_errors(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(status=401, error_message=f"Incorrect API key provided: {API_KEY}."))
    with pytest.raises(UpstreamError) as caught:
        await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))
    assert API_KEY not in str(caught.value)
    assert "Incorrect API key provided: ***." in caught.value.message


def test_error_message_reads_both_envelopes_or_the_start_of_the_body() -> None:
    assert error_message(b'{"error": {"message": "bad model", "type": "x"}}') == "bad model"
    assert error_message(b'{"type": "error", "error": {"type": "x", "message": "nope"}}') == "nope"
    assert error_message(b'{"error": "plain"}') == "plain"
    page = b"<html>" + b"x" * 1000
    assert error_message(page) == page[:300].decode()


@pytest.mark.asyncio
async def test_connection_refused_is_unavailable(session: HttpClient) -> None:
    model = make_model(session, f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(UpstreamUnavailableError) as caught:
        await collect(model, ChatRequest("gpt-test", HELLO))
    assert caught.value.provider == "openai"


@pytest.mark.asyncio
async def test_slow_answer_times_out(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(delay=3.0))
    model = make_model(session, fake.openai_base_url, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError):
        await collect(model, ChatRequest("gpt-test", HELLO))
    assert time.monotonic() - started < 2.0  # gave up at the timeout, not when the upstream answered


@pytest.mark.asyncio
async def test_stream_stalling_past_the_timeout_times_out(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(chunks=["a", "b", "c"], chunk_delay=2.0))
    model = make_model(session, fake.openai_base_url, timeout=0.5)
    seen: list[ChatEvent] = []
    with pytest.raises(UpstreamTimeoutError):
        await drain(model.stream(ChatRequest("gpt-test", HELLO)), seen)
    assert seen == []  # the first chunk only carries the role


@pytest.mark.asyncio
async def test_malformed_chunk_is_an_upstream_error(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(
        Reply(raw_stream=['data: {"choices": [{"delta": {"content": "ok"}}]}\n\n', "data: {oops\n\n"])
    )
    seen: list[ChatEvent] = []
    with pytest.raises(UpstreamError, match="malformed stream chunk"):
        await drain(make_model(session, fake.openai_base_url).stream(ChatRequest("gpt-test", HELLO)), seen)
    assert seen == [TextDelta("ok")]


@pytest.mark.asyncio
async def test_error_inside_the_stream_is_an_upstream_error(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(text="partial", stream_error="the model fell over"))
    with pytest.raises(UpstreamError, match="the model fell over"):
        await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))


@pytest.mark.asyncio
async def test_stream_ending_without_finish_reason_is_an_upstream_error(
    fake: FakeUpstream, session: HttpClient
) -> None:
    fake.enqueue(
        Reply(raw_stream=['data: {"choices": [{"delta": {"content": "cut"}}]}\n\n', "data: [DONE]\n\n"])
    )
    with pytest.raises(UpstreamError, match="without a finish_reason"):
        await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))


# -- the client leaving


@pytest.mark.asyncio
async def test_closing_the_stream_early_closes_the_upstream_connection(
    fake: FakeUpstream, session: HttpClient
) -> None:
    fake.enqueue(Reply(chunks=["tick "] * 100, chunk_delay=0.05))
    stream = make_model(session, fake.openai_base_url).stream(ChatRequest("gpt-test", HELLO))

    assert await anext(stream) == TextDelta("tick ")
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()

    assert await asyncio.to_thread(fake.wait_for_cancelled, 1, 1.0)


@pytest.mark.asyncio
async def test_cancelling_the_consumer_closes_the_upstream_connection(
    fake: FakeUpstream, session: HttpClient
) -> None:
    fake.enqueue(Reply(chunks=["tick "] * 100, chunk_delay=0.05))
    model = make_model(session, fake.openai_base_url)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in model.stream(ChatRequest("gpt-test", HELLO)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await asyncio.to_thread(fake.wait_for_cancelled, 1, 1.0)


# -- the SSE decoder, over the wire and alone


@pytest.mark.asyncio
async def test_crlf_comments_multiline_data_and_split_lines(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(
        Reply(
            raw_stream=[
                ": keep-alive comment\r\n\r\n",
                'data: {"choices": [{"delta": {"content": "Hé"}}]}\r\n\r\n',
                # one event in two data lines
                'data: {"choices": [{"delta":\r\ndata:  {"content": "llo"}}]}\r\n',
                '\r\ndata: {"choices": [{"delta": {}, "fin',  # a line split across writes
                'ish_reason": "stop"}]}\n\n',
                'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}\n\n',
                "data: [DONE]",  # no trailing newline at all
            ],
            chunk_delay=0.01,
        )
    )
    events, _ = await collect(make_model(session, fake.openai_base_url), ChatRequest("gpt-test", HELLO))
    assert events == [TextDelta("Hé"), TextDelta("llo"), Usage(2, 1), Finish("stop")]


def test_decoder_events_fields_and_final_event() -> None:
    decoder = SSEDecoder()
    stream = (
        b"event: ping\ndata: {}\n\n"
        b": comment\nid: 3\nretry: 10\ndata: a\ndata\ndata: b\n\n"
        b"event: x\n\n"
        b"data:tail"
    )
    events = [*decoder.feed(stream[:17]), *decoder.feed(stream[17:]), *decoder.flush()]
    assert events == [
        ServerSentEvent("ping", "{}"),
        ServerSentEvent("message", "a\n\nb"),
        ServerSentEvent("message", "tail"),  # an event with only a name is dropped, per the SSE spec
    ]


def test_decoder_keeps_multibyte_characters_split_across_chunks() -> None:
    raw = "data: ünïcødé ✓\n\n".encode()
    decoder = SSEDecoder()
    events = [event for index in range(len(raw)) for event in decoder.feed(raw[index : index + 1])]
    assert events == [ServerSentEvent("message", "ünïcødé ✓")]
