"""Bounds before work: caps on the request's lists and free-form fields (a 400 naming the field), max_tokens
capped at the alias's max_output_tokens, and a deadline for the request body."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from keel.gateway.chat.protocol import (
    MAX_MESSAGES,
    MAX_PROMPT_VARIABLES,
    MAX_STOP_CHARS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    MAX_USER_CHARS,
)
from keel.settings import ModelConfig, TierLimits
from keel.testing import FakeUpstream
from keel.testing.server import KeelServer

HI = {"role": "user", "content": "Hi"}


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def _call(index: int) -> dict[str, Any]:
    return {"id": f"call_{index}", "type": "function", "function": {"name": "f", "arguments": "{}"}}


OVER_THE_CAPS: list[tuple[str, dict[str, Any]]] = [
    ("messages", {"messages": [HI] * (MAX_MESSAGES + 1)}),
    ("tools", {"messages": [HI], "tools": [_tool(f"t{i}") for i in range(MAX_TOOLS + 1)]}),
    ("tools.0.function.name", {"messages": [HI], "tools": [_tool("f" * 65)]}),
    ("stop", {"messages": [HI], "stop": ["a", "b", "c", "d", "e"]}),
    ("stop", {"messages": [HI], "stop": ["x" * (MAX_STOP_CHARS + 1)]}),
    ("stop", {"messages": [HI], "stop": "x" * (MAX_STOP_CHARS + 1)}),
    ("user", {"messages": [HI], "user": "u" * (MAX_USER_CHARS + 1)}),
    ("model", {"messages": [HI], "model": "m" * 257}),
    ("messages.0.name", {"messages": [{**HI, "name": "n" * 257}]}),
    (
        "messages.0.tool_calls",
        {
            "messages": [
                {"role": "assistant", "tool_calls": [_call(i) for i in range(MAX_TOOL_CALLS + 1)]},
                HI,
            ]
        },
    ),
    ("messages.0.tool_call_id", {"messages": [{"role": "tool", "content": "4", "tool_call_id": "c" * 257}]}),
    (
        "prompt.variables",
        {"messages": [HI], "prompt": {"variables": {f"v{i}": 1 for i in range(MAX_PROMPT_VARIABLES + 1)}}},
    ),
]


@pytest.mark.parametrize(
    ("param", "body"), OVER_THE_CAPS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(OVER_THE_CAPS)]
)
def test_a_field_over_its_cap_is_a_400_naming_it(
    keel: KeelServer, tenant: Any, fake: FakeUpstream, param: str, body: dict[str, Any]
) -> None:
    answer = httpx.post(
        f"{keel.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.chat_key}"},
        json={"model": "fake", **body},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"].startswith(f"Invalid '{param}': ")
    assert not fake.requests  # refused before any model call


def test_stop_errors_say_what_is_wrong(keel: KeelServer, tenant: Any) -> None:
    answer = httpx.post(
        f"{keel.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.chat_key}"},
        json={"model": "fake", "messages": [HI], "stop": ["a", "b", "c", "d", "e"]},
    )
    assert answer.json()["error"]["message"] == "Invalid 'stop': at most 4 stop sequences, not 5."


def test_requests_at_the_caps_are_served(client: openai.OpenAI, fake: FakeUpstream) -> None:
    client.chat.completions.create(
        model="fake",
        messages=[HI] * MAX_MESSAGES,
        tools=[_tool(f"t{i}") for i in range(MAX_TOOLS)],  # type: ignore[misc]
        stop=["s" * MAX_STOP_CHARS] * 4,
        user="u" * MAX_USER_CHARS,
    )
    sent = fake.requests[-1].body
    assert len(sent["messages"]) == MAX_MESSAGES and len(sent["tools"]) == MAX_TOOLS
    assert sent["stop"] == ["s" * MAX_STOP_CHARS] * 4


def test_max_tokens_above_the_alias_cap_is_capped(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
) -> None:
    capped = ModelConfig(
        provider="openai", base_url=fake.openai_base_url, model="fake-gpt", max_output_tokens=50
    )
    free = {"free": TierLimits(requests_per_minute=100, tokens_per_minute=10_000, concurrent_requests=4)}
    server = start_keel(models={"capped": capped}, default_model="capped", tiers=free)
    client = make_client(server, make_tenant("free").chat_key)

    # Far above the tier's tokens per minute too: capped before the estimate, so served, not a 429.
    client.chat.completions.create(model="capped", messages=[HI], max_tokens=1_000_000)
    assert fake.requests[-1].body["max_tokens"] == 50
    client.chat.completions.create(model="capped", messages=[HI], max_completion_tokens=20)
    assert fake.requests[-1].body["max_tokens"] == 20  # below the cap: as asked
    client.chat.completions.create(model="capped", messages=[HI])
    assert fake.requests[-1].body["max_tokens"] == 50  # none asked: the alias's default, as before


def _send_part_of_a_body(server: KeelServer, path: str, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"messages": ['.encode()
    )
    return sock


def _status_and_body(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/feedback"])
def test_a_body_that_does_not_arrive_in_time_is_a_408(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any], path: str
) -> None:
    server = start_keel(body_read_timeout_seconds=0.5)
    started = time.monotonic()
    with _send_part_of_a_body(server, path, make_tenant().chat_key) as sock:
        status, body = _status_and_body(sock)
    assert status == 408, body
    assert 0.4 < time.monotonic() - started < 5
    error = httpx.Response(200, content=body).json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
