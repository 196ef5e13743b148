"""Per-tenant tier limits through the gateway: exact in-process, and shared through the real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from keel.settings import TierLimits
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

MESSAGES = [{"role": "user", "content": "Hi"}]


def _tiers(rpm: int = 1000, tpm: int = 1_000_000, concurrent: int = 100) -> dict[str, TierLimits]:
    return {
        "free": TierLimits(requests_per_minute=rpm, tokens_per_minute=tpm, concurrent_requests=concurrent)
    }


def test_requests_per_minute_exact_with_headers(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
) -> None:
    server = start_keel(tiers=_tiers(rpm=3))
    client = make_client(server, make_tenant("free").chat_key)
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="fake", messages=MESSAGES)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert int(raw.headers["x-ratelimit-limit-tokens"]) == 1_000_000
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert "requests per minute" in caught.value.message
    assert caught.value.response.headers["x-request-id"]


def test_limits_are_per_tenant(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
) -> None:
    server = start_keel(tiers=_tiers(rpm=1))
    first, second = (
        make_client(server, make_tenant("free").chat_key),
        make_client(server, make_tenant("free").chat_key),
    )
    first.chat.completions.create(model="fake", messages=MESSAGES)
    second.chat.completions.create(model="fake", messages=MESSAGES)  # its own budget
    with pytest.raises(openai.RateLimitError):
        first.chat.completions.create(model="fake", messages=MESSAGES)


def test_tokens_per_minute_estimate_and_correction(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
) -> None:
    server = start_keel(tiers=_tiers(tpm=1_000))
    client = make_client(server, make_tenant("free").chat_key)
    with pytest.raises(openai.RateLimitError) as caught:  # max_tokens alone exceeds the tier: never passes
        client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=5_000)
    assert "tokens per minute" in caught.value.message
    # An estimate of ~300 tokens passes; the real usage (900) is charged afterwards, so the next is refused.
    fake.enqueue(Reply(text="long answer", input_tokens=400, output_tokens=500))
    raw = client.chat.completions.with_raw_response.create(model="fake", messages=MESSAGES, max_tokens=300)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 600
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=300)
    assert "tokens per minute" in caught.value.message


def test_concurrent_requests_limit(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
) -> None:
    server = start_keel(tiers=_tiers(concurrent=1))
    client = make_client(server, make_tenant("free").chat_key)
    fake.enqueue(Reply(delay=1.0))
    slow = threading.Thread(target=lambda: client.chat.completions.create(model="fake", messages=MESSAGES))
    slow.start()
    try:
        deadline = time.monotonic() + 5
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="fake", messages=MESSAGES)
        assert "concurrent requests" in caught.value.message
    finally:
        slow.join()
    client.chat.completions.create(model="fake", messages=MESSAGES)  # the slot came back


@pytest.mark.redis
def test_two_keel_instances_share_one_budget_through_redis(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    redis_url: str,
) -> None:
    one = start_keel(tiers=_tiers(rpm=4), redis_url=redis_url)
    two = start_keel(tiers=_tiers(rpm=4), redis_url=redis_url)
    key = make_tenant("free").chat_key
    clients = [make_client(one, key), make_client(two, key)]
    for i in range(4):
        clients[i % 2].chat.completions.create(model="fake", messages=MESSAGES)
    for client in clients:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="fake", messages=MESSAGES)
