"""/openapi.json describes POST /v1/chat/completions (a hot route FastAPI cannot see) with its real request
and response schemas, and real answers match those schemas."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from keel.gateway.chat.protocol import ChatCompletion, ChatCompletionChunk, ErrorResponse
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref: str | None = node.get("$ref")
    if ref is None:
        return node
    found: dict[str, Any] = schema
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return found


def test_openapi_lists_chat_completions_with_its_schemas(keel: KeelServer) -> None:
    schema = httpx.get(f"{keel.url}/openapi.json").json()
    operation = schema["paths"]["/v1/chat/completions"]["post"]

    body = _resolve(schema, operation["requestBody"]["content"]["application/json"]["schema"])
    assert {"messages", "model"} <= set(body["properties"])
    assert body["required"] == ["messages"]
    assert body["additionalProperties"] is False  # unknown fields are a 400: generated clients know it
    assert body["properties"]["messages"]["maxItems"] == 2048  # the caps are in the schema
    roles = body["properties"]["messages"]["items"]["discriminator"]["mapping"]
    assert set(roles) == {"system", "developer", "user", "assistant", "tool"}
    user = _resolve(schema, {"$ref": roles["user"]})
    assert {"role", "content"} <= set(user["properties"])

    answers = operation["responses"]["200"]["content"]
    completion = _resolve(schema, answers["application/json"]["schema"])
    assert {"id", "choices", "created", "model", "object", "usage"} <= set(completion["properties"])
    chunk = _resolve(schema, answers["text/event-stream"]["schema"])
    assert chunk["properties"]["object"]["const"] == "chat.completion.chunk"
    error = _resolve(schema, operation["responses"]["400"]["content"]["application/json"]["schema"])
    assert set(_resolve(schema, error["properties"]["error"])["properties"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert {"bearer", "api_key"} <= set(schema["components"]["securitySchemes"])
    assert "/v1/models" in schema["paths"]  # FastAPI's own routes are still there


def test_real_answers_match_the_published_schemas(
    keel: KeelServer, tenant: Any, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    """The response models are documentation (the hot path builds dicts): hold real answers to them."""
    headers = {"Authorization": f"Bearer {tenant.chat_key}"}
    url = f"{keel.base_url}/chat/completions"
    tool_call = {"id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'}
    fake.enqueue(Reply(text="Hi there", input_tokens=3, output_tokens=2))
    fake.enqueue(Reply(text="", tool_calls=[tool_call]))
    fake.enqueue(Reply(text="one two", chunks=["one", " two"], input_tokens=3, output_tokens=2))
    fake.enqueue(Reply(text="", tool_calls=[tool_call]))

    plain = httpx.post(url, headers=headers, json={"messages": [{"role": "user", "content": "Hi"}]})
    ChatCompletion.model_validate_json(plain.content, strict=True)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    called = httpx.post(
        url, headers=headers, json={"messages": [{"role": "user", "content": "?"}], "tools": tools}
    )
    assert ChatCompletion.model_validate_json(called.content).choices[0].message.tool_calls

    for body in (
        {
            "messages": [{"role": "user", "content": "count"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"messages": [{"role": "user", "content": "?"}], "stream": True, "tools": tools},
    ):
        with httpx.stream("POST", url, headers=headers, json=body) as streamed:
            events = [
                line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")
            ]
        assert events[-1] == "[DONE]"
        chunks = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
        assert chunks

    refused = httpx.post(url, headers=headers, json={"messages": []})
    assert refused.status_code == 400
    ErrorResponse.model_validate_json(refused.content)
