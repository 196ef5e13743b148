"""Every error is the OpenAI envelope with the right status and a request id; nothing answers 500."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


def _post(
    keel: KeelServer, key: str | None, body: Any = None, content: bytes | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{keel.base_url}/chat/completions", headers=headers, content=content, timeout=30)
    return httpx.post(f"{keel.base_url}/chat/completions", headers=headers, json=body, timeout=30)


def _assert_envelope(response: httpx.Response, status: int, param: str | None = "unset") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    assert "Traceback" not in error["message"]
    if param != "unset":
        assert error["param"] == param
    return dict(error)


MESSAGES = [{"role": "user", "content": "Hi"}]


def test_missing_and_wrong_keys_are_401(keel: KeelServer, make_client: Callable[..., openai.OpenAI]) -> None:
    error = _assert_envelope(_post(keel, None, {"messages": MESSAGES}), 401)
    assert error["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as caught:
        make_client(keel, "sk-keel-not-a-real-key").chat.completions.create(model="fake", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_chat_key_on_admin_route_is_403(keel: KeelServer, tenant: Any) -> None:
    response = httpx.get(f"{keel.base_url}/keys", headers={"Authorization": f"Bearer {tenant.chat_key}"})
    _assert_envelope(response, 403)
    response = httpx.get(f"{keel.base_url}/keys", headers={"Authorization": f"Bearer {tenant.admin_key}"})
    assert response.status_code == 200
    assert {k["scope"] for k in response.json()["data"]} == {"chat", "admin"}


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "gpt-nope" in caught.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"messages": MESSAGES, "n": 2}, "n"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": MESSAGES, "conversation_id": "has spaces"}, "conversation_id"),
        ([1, 2], None),
    ],
)
def test_malformed_bodies_are_400(keel: KeelServer, tenant: Any, body: Any, param: str | None) -> None:
    error = _assert_envelope(_post(keel, tenant.chat_key, body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_unparseable_json_is_400(keel: KeelServer, tenant: Any) -> None:
    error = _assert_envelope(_post(keel, tenant.chat_key, content=b'{"messages": [}'), 400)
    assert "JSON" in error["message"]


def test_sdk_raises_bad_request_for_unknown_role(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake", messages=[{"role": "robot", "content": "x"}])  # type: ignore[misc, list-item]


def test_oversized_body_is_413(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any]
) -> None:
    server = start_keel(max_body_bytes=2_000)
    key = make_tenant().chat_key
    big = {"messages": [{"role": "user", "content": "x" * 5_000}]}
    error = _assert_envelope(_post(server, key, big), 413)
    assert "2000" in error["message"]

    def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    response = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=chunked(),
    )
    _assert_envelope(response, 413)


@pytest.mark.parametrize(
    ("upstream_status", "status", "error_type"),
    [
        (500, 502, openai.InternalServerError),
        (503, 503, openai.InternalServerError),
        (400, 400, openai.BadRequestError),
    ],
)
def test_upstream_failures_map_to_gateway_statuses(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
    upstream_status: int,
    status: int,
    error_type: type[Exception],
) -> None:
    # A Keel of its own: its circuit breaker counts these failures, and must not open the shared one's.
    client = make_client(start_keel(), make_tenant().chat_key)
    fake.default_reply = Reply(status=upstream_status, error_message="upstream says no")  # retries too
    with pytest.raises(error_type) as caught:
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert caught.value.status_code == status  # type: ignore[attr-defined]


def test_upstream_timeout_is_504(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    fake: FakeUpstream,
    make_client: Callable[..., openai.OpenAI],
) -> None:
    from keel.settings import ModelConfig

    server = start_keel(
        models={"slow": ModelConfig(provider="openai", base_url=fake.openai_base_url, timeout=0.5)},
        default_model="slow",
    )
    fake.enqueue(Reply(delay=3))
    with pytest.raises(openai.APIStatusError) as caught:
        make_client(server, make_tenant().chat_key).chat.completions.create(model="slow", messages=MESSAGES)
    assert caught.value.status_code == 504


def test_unknown_route_and_method_are_enveloped(keel: KeelServer, tenant: Any) -> None:
    _assert_envelope(httpx.get(f"{keel.url}/v1/nothing-here"), 404)
    _assert_envelope(httpx.get(f"{keel.base_url}/chat/completions"), 405)


def test_error_in_the_middle_of_a_stream_is_reported_in_band(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(text="a b", chunks=["a", " b"], stream_error="upstream went away"))
    stream = client.chat.completions.create(model="fake", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError):  # noqa: PT012 - the error arrives while iterating
        for chunk in stream:
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert received[:2] == ["a", " b"]
