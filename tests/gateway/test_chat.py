"""Chat completions through a real Keel with the official openai SDK, against a real FakeUpstream."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai

from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


def test_non_streaming_completion_has_the_sdk_shape(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(text="Bonjour le monde", input_tokens=12, output_tokens=3))
    completion = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}])
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "fake"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Bonjour le monde"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 3)
    assert completion.usage.total_tokens == 15


def test_streaming_delivers_chunks_and_usage_in_the_last_one(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(text="one two three", chunks=["one", " two", " three"], input_tokens=5, output_tokens=3)
    )
    stream = client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 3
    assert all(c.object == "chat.completion.chunk" and c.model == "fake" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 3)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, fake: FakeUpstream) -> None:
    chunks = list(
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert chunks and all(c.choices for c in chunks)


def test_raw_stream_ends_with_done(keel: KeelServer, tenant: Any, fake: FakeUpstream) -> None:
    key = tenant.chat_key
    with httpx.stream(
        "POST",
        f"{keel.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_parameters_reach_the_upstream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    client.chat.completions.create(
        model="fake",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        max_completion_tokens=42,
        temperature=0.3,
        top_p=0.9,
        stop=["END"],
        seed=7,
        user="end-user-1",
    )
    sent = fake.requests[-1].body
    assert sent["model"] == "fake-gpt"  # the alias's pinned upstream id
    assert sent["max_tokens"] == 42
    assert (sent["temperature"], sent["top_p"], sent["stop"], sent["seed"]) == (0.3, 0.9, ["END"], 7)
    assert sent["user"] == "end-user-1"
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1]["content"] == [{"type": "text", "text": "Hi"}]


def test_tool_calls_pass_through(client: openai.OpenAI, fake: FakeUpstream) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    fake.enqueue(Reply(text="", tool_calls=[call]))
    completion = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "Weather?"}], tools=tools, tool_choice="auto"
    )
    assert fake.requests[-1].body["tools"] == tools
    assert fake.requests[-1].body["tool_choice"] == "auto"
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    tool_call = choice.message.tool_calls[0]
    assert (tool_call.id, tool_call.function.name) == ("call_1", "get_weather")
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}

    fake.enqueue(Reply(text="", tool_calls=[call]))
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "Weather?"}], tools=tools, stream=True
    )
    arguments, names = "", []
    for chunk in stream:
        for piece in chunk.choices[0].delta.tool_calls or []:
            arguments += piece.function.arguments or "" if piece.function else ""
            if piece.function and piece.function.name:
                names.append(piece.function.name)
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Paris"}


def test_anthropic_alias_answers_in_openai_format(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(text="Hello from Claude", input_tokens=9, output_tokens=4))
    completion = client.chat.completions.create(
        model="claude",
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        max_tokens=50,
    )
    assert completion.choices[0].message.content == "Hello from Claude"
    assert completion.model == "claude"
    assert completion.usage is not None and completion.usage.prompt_tokens == 9
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.body["system"] == "You are terse."
    assert [m["role"] for m in sent.body["messages"]] == ["user"]
    assert "Hi" in str(sent.body["messages"][0]["content"])
    assert sent.body["model"] == "claude-test"
    assert sent.headers["x-api-key"] == "sk-ant-test"


def test_request_ids_are_keels_own_and_a_client_id_is_kept_apart(client: openai.OpenAI) -> None:
    ids = set()
    for header in ("X-Request-ID", "X-Client-Request-Id", "X-Request-ID"):
        raw = client.chat.completions.with_raw_response.create(
            model="fake", messages=[{"role": "user", "content": "x"}], extra_headers={header: "my-trace-42"}
        )
        assert raw.headers["x-client-request-id"] == "my-trace-42"  # echoed, never taken as the id
        ids.add(raw.headers["x-request-id"])
    assert len(ids) == 3 and all(i.startswith("req_") and len(i) == 36 for i in ids)  # unique
    raw = client.chat.completions.with_raw_response.create(
        model="fake",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-Request-ID": "bad id\twith junk"},
    )
    assert raw.headers["x-request-id"].startswith("req_")
    assert "x-client-request-id" not in raw.headers


def test_models_lists_the_aliases(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"local", "fake", "claude"} <= ids


def test_default_model_is_used_when_none_is_named(keel: KeelServer, tenant: Any) -> None:
    key = tenant.chat_key
    response = httpx.post(
        f"{keel.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 200
    assert response.json()["model"] == "fake"


def test_cors_preflight_and_answers_for_configured_origins(start_keel: Any, tenant: Any) -> None:
    server = start_keel(cors_origins=["https://app.example"])
    preflight = httpx.options(
        f"{server.base_url}/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{server.base_url}/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers
    answer = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Origin": "https://app.example", "Authorization": f"Bearer {tenant.chat_key}"},
        json={"messages": [{"role": "user", "content": "Hi"}]},
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in answer.headers["access-control-expose-headers"]
