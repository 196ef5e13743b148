"""AnthropicChatModel against a real FakeUpstream over real HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
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
from keel.llm.anthropic import AnthropicChatModel
from keel.llm.events import ChatEvent, ChatRequest, ChatResult, Finish, TextDelta, ToolCallDelta, Usage
from keel.llm.http import HttpClient
from keel.settings import ModelConfig
from keel.testing import FakeUpstream, Reply

API_KEY = "sk-ant-test-0123456789"
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


def make_model(session: HttpClient, base_url: str, **config: Any) -> AnthropicChatModel:
    settings = ModelConfig(provider="anthropic", base_url=base_url, **({"api_key": API_KEY} | config))
    return AnthropicChatModel("claude-test", settings, session)


async def collect(model: AnthropicChatModel, request: ChatRequest) -> tuple[list[ChatEvent], ChatResult]:
    events = [event async for event in model.stream(request)]
    result = ChatResult()
    for event in events:
        result.add(event)
    return events, result


async def drain(stream: AsyncIterator[ChatEvent], seen: list[ChatEvent]) -> None:
    """Read to the end, keeping what arrived before a failure."""
    async for event in stream:
        seen.append(event)


async def sent_body(fake: FakeUpstream, session: HttpClient, request: ChatRequest) -> Any:
    await collect(make_model(session, fake.base_url), request)
    return fake.requests[-1].body


# -- streaming


@pytest.mark.asyncio
async def test_text_arrives_as_deltas_then_usage_then_finish(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(text="Hello there", chunks=["Hel", "lo", " there"], input_tokens=11, output_tokens=4))

    events, result = await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))

    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta(" there"),
        Usage(input_tokens=11, output_tokens=4),
        Finish("stop"),
    ]
    assert result.text == "Hello there"
    assert fake.cancelled_streams == 0


@pytest.mark.asyncio
async def test_cache_tokens_count_as_input(fake: FakeUpstream, session: HttpClient) -> None:
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 3, "cache_read_input_tokens": 100, "output_tokens": 1}},
    }
    fake.enqueue(
        Reply(
            raw_stream=[
                f"event: message_start\ndata: {json.dumps(start)}\n\n",
                'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "end_turn"},'
                ' "usage": {"output_tokens": 9}}\n\n',
                'event: message_stop\ndata: {"type": "message_stop"}\n\n',
            ]
        )
    )
    events, _ = await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))
    assert events == [Usage(103, 9, cached_input_tokens=100), Finish("stop")]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
@pytest.mark.asyncio
async def test_stop_reason_maps_onto_finish_reason(
    fake: FakeUpstream, session: HttpClient, stop_reason: str, finish: str
) -> None:
    fake.enqueue(Reply(text="x", finish_reason=stop_reason))
    events, _ = await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))
    assert events[-1] == Finish(finish)


# -- the request


@pytest.mark.asyncio
async def test_headers_and_parameters(fake: FakeUpstream, session: HttpClient) -> None:
    model = make_model(session, fake.base_url, model="claude-sonnet-4-5", headers={"anthropic-beta": "b1"})
    request = ChatRequest(
        "claude-test", HELLO, max_tokens=300, temperature=0.5, top_p=0.8, stop=["END"], seed=3, user="u-7"
    )

    await collect(model, request)

    (sent,) = fake.requests
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert sent.body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "stream": True,
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_p": 0.8,
        "metadata": {"user_id": "u-7"},
    }
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "b1"
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers


@pytest.mark.asyncio
async def test_max_tokens_defaults_to_config_then_4096(fake: FakeUpstream, session: HttpClient) -> None:
    await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))
    await collect(
        make_model(session, fake.base_url, max_output_tokens=777), ChatRequest("claude-test", HELLO)
    )
    assert [sent.body["max_tokens"] for sent in fake.requests] == [4096, 777]
    assert fake.requests[0].body["model"] == "claude-test"  # the alias, when no model is pinned


@pytest.mark.asyncio
async def test_conversation_is_translated(fake: FakeUpstream, session: HttpClient) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "24C"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}],
        },
        {"role": "user", "content": "Briefly."},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "Mild."},
    ]

    body = await sent_body(fake, session, ChatRequest("claude-test", messages))

    assert body["system"] == "You are terse.\n\nUse metric units."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "c2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "c2", "content": [{"type": "text", "text": "24C"}]},
                {"type": "text", "text": "And "},
                {"type": "text", "text": "tomorrow?"},
                {"type": "text", "text": "Briefly."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Mild."}]},
    ]


@pytest.mark.asyncio
async def test_images_become_image_blocks(fake: FakeUpstream, session: HttpClient) -> None:
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    body = await sent_body(fake, session, ChatRequest("claude-test", [{"role": "user", "content": content}]))
    assert body["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "weather"}}, {"type": "tool", "name": "weather"}),
    ],
)
@pytest.mark.asyncio
async def test_tools_and_tool_choice(
    fake: FakeUpstream, session: HttpClient, tool_choice: Any, expected: dict[str, str]
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather now", "parameters": schema},
        },
        {"type": "function", "function": {"name": "clock"}},
    ]

    body = await sent_body(
        fake, session, ChatRequest("claude-test", HELLO, tools=tools, tool_choice=tool_choice)
    )

    assert body["tools"] == [
        {"name": "weather", "description": "Weather now", "input_schema": schema},
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == expected


@pytest.mark.parametrize(
    "request_",
    [
        ChatRequest("claude-test", [{"role": "function", "name": "f", "content": "x"}]),
        ChatRequest(
            "claude-test", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
        ),
        ChatRequest(
            "claude-test",
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}
                    ],
                }
            ],
        ),
        ChatRequest("claude-test", HELLO, tool_choice="sometimes"),
    ],
    ids=["function-role", "audio-part", "bad-arguments", "bad-tool-choice"],
)
@pytest.mark.asyncio
async def test_untranslatable_requests_fail_before_any_call(
    fake: FakeUpstream, session: HttpClient, request_: ChatRequest
) -> None:
    with pytest.raises(InvalidRequestError):
        await collect(make_model(session, fake.base_url), request_)
    assert fake.requests == []


# -- tool calls coming back


@pytest.mark.asyncio
async def test_tool_use_streams_as_tool_call_deltas(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(
        Reply(
            text="Let me check.",
            tool_calls=[
                {"id": "toolu_1", "name": "weather", "arguments": {"city": "Paris", "days": 3}},
                {"id": "toolu_2", "name": "clock", "arguments": {}},
            ],
        )
    )

    events, result = await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))

    assert ToolCallDelta(index=0, id="toolu_1", name="weather") in events
    assert ToolCallDelta(index=1, id="toolu_2", name="clock") in events
    assert result.text == "Let me check."
    assert result.finish_reason == "tool_calls"
    assert [(call["id"], call["function"]["name"]) for call in result.tool_calls] == [
        ("toolu_1", "weather"),
        ("toolu_2", "clock"),
    ]
    assert json.loads(result.tool_calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert json.loads(result.tool_calls[1]["function"]["arguments"]) == {}


@pytest.mark.asyncio
async def test_tool_without_input_gets_empty_object_arguments(
    fake: FakeUpstream, session: HttpClient
) -> None:
    tool = {"type": "tool_use", "id": "toolu_9", "name": "clock", "input": {}}
    fake.enqueue(
        Reply(
            raw_stream=[
                "event: message_start\n"
                'data: {"type":"message_start","message":{"usage":{"input_tokens":1}}}\n\n',
                "event: content_block_start\ndata: "
                + json.dumps({"type": "content_block_start", "index": 0, "content_block": tool})
                + "\n\n",
                'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
                'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use"},'
                '"usage":{"output_tokens":2}}\n\n',
            ]
        )
    )
    _, result = await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))
    assert result.tool_calls == [
        {"id": "toolu_9", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
    ]


# -- errors


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, InvalidRequestError),
        (401, UpstreamError),
        (500, UpstreamError),
        (529, UpstreamUnavailableError),
    ],
)
@pytest.mark.asyncio
async def test_error_statuses_map_onto_the_taxonomy(
    fake: FakeUpstream, session: HttpClient, status: int, error_type: type[KeelError]
) -> None:
    fake.enqueue(Reply(status=status, error_message=f"scripted failure {status}"))
    with pytest.raises(error_type) as caught:
        await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))
    assert type(caught.value) is error_type
    assert f"scripted failure {status}" in caught.value.message
    assert API_KEY not in caught.value.message


@pytest.mark.asyncio
async def test_wrong_key_is_a_401_upstream_error(session: HttpClient) -> None:
    with FakeUpstream(api_key="the-right-key") as fake, pytest.raises(UpstreamError) as caught:
        await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))
    assert isinstance(caught.value, UpstreamError)
    assert caught.value.upstream_status == 401
    assert API_KEY not in caught.value.message


@pytest.mark.asyncio
async def test_429_keeps_retry_after(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(status=429, headers={"Retry-After": "12"}))
    with pytest.raises(RateLimitError) as caught:
        await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))
    assert caught.value.headers == {"Retry-After": "12"}


@pytest.mark.asyncio
async def test_connection_refused_is_unavailable(session: HttpClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamUnavailableError):
        await collect(make_model(session, f"http://127.0.0.1:{port}"), ChatRequest("claude-test", HELLO))


@pytest.mark.asyncio
async def test_slow_answer_times_out(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(delay=3.0))
    with pytest.raises(UpstreamTimeoutError):
        await collect(make_model(session, fake.base_url, timeout=0.3), ChatRequest("claude-test", HELLO))


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [("overloaded_error", UpstreamUnavailableError), ("api_error", UpstreamError)],
)
@pytest.mark.asyncio
async def test_error_event_in_the_stream(
    fake: FakeUpstream, session: HttpClient, error_type: str, expected: type[UpstreamError]
) -> None:
    fake.enqueue(Reply(text="partial", stream_error="Overloaded", error_type=error_type))
    seen: list[ChatEvent] = []
    with pytest.raises(expected) as caught:
        await drain(make_model(session, fake.base_url).stream(ChatRequest("claude-test", HELLO)), seen)
    assert type(caught.value) is expected
    assert "Overloaded" in caught.value.message
    assert seen == [TextDelta("partial")]


@pytest.mark.asyncio
async def test_malformed_event_is_an_upstream_error(fake: FakeUpstream, session: HttpClient) -> None:
    fake.enqueue(Reply(raw_stream=["event: message_start\ndata: {broken\n\n"]))
    with pytest.raises(UpstreamError, match="malformed stream event"):
        await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))


@pytest.mark.asyncio
async def test_stream_ending_without_stop_reason_is_an_upstream_error(
    fake: FakeUpstream, session: HttpClient
) -> None:
    fake.enqueue(Reply(raw_stream=['event: ping\ndata: {"type": "ping"}\n\n']))
    with pytest.raises(UpstreamError, match="without a stop_reason"):
        await collect(make_model(session, fake.base_url), ChatRequest("claude-test", HELLO))


# -- the client leaving


@pytest.mark.asyncio
async def test_closing_the_stream_early_closes_the_upstream_connection(
    fake: FakeUpstream, session: HttpClient
) -> None:
    fake.enqueue(Reply(chunks=["tick "] * 100, chunk_delay=0.05))
    stream = make_model(session, fake.base_url).stream(ChatRequest("claude-test", HELLO))

    assert await anext(stream) == TextDelta("tick ")
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()

    assert await asyncio.to_thread(fake.wait_for_cancelled, 1, 1.0)


@pytest.mark.asyncio
async def test_cancelling_the_consumer_closes_the_upstream_connection(
    fake: FakeUpstream, session: HttpClient
) -> None:
    fake.enqueue(Reply(chunks=["tick "] * 100, chunk_delay=0.05))
    model = make_model(session, fake.base_url)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in model.stream(ChatRequest("claude-test", HELLO)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await asyncio.to_thread(fake.wait_for_cancelled, 1, 1.0)
