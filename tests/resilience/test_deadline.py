"""Deadlines and cancellation through the gateway: `X-Keel-Timeout`, the total deadline mid-stream, and a
client that leaves while Keel waits (backoff, a silent upstream)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from keel.settings import RetryConfig, Settings, TierLimits
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

from ._support import MESSAGES, ask, openai_alias


@pytest.mark.parametrize("value", ["soon", "-1", "0", "nan", "inf", ""])
def test_a_bad_timeout_header_is_400(matrix: KeelServer, client: openai.OpenAI, value: str) -> None:
    response = httpx.post(
        f"{matrix.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {client.api_key}", "X-Keel-Timeout": value},
        json={"model": "primary", "messages": MESSAGES},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_timeout"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_client_shortens_the_deadline_504_in_time(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.default_reply = backup.default_reply = Reply(hang=True)
    answer = ask(client, "primary", stream=stream, headers={"X-Keel-Timeout": "0.8"})
    assert answer.status == 504 and "deadline" in answer.error
    assert 0.8 <= answer.elapsed < 1.3
    assert len(fake.requests) == 2 and not backup.requests  # 0.5 s, then the 0.3 s left; no time for more


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_deadline_ends_a_long_stream(client: openai.OpenAI, fake: FakeUpstream, stream: bool) -> None:
    fake.default_reply = Reply(chunks=["tick "] * 50, chunk_delay=0.1)
    answer = ask(client, "primary", stream=stream, headers={"X-Keel-Timeout": "1"})
    assert answer.elapsed < 1.5
    if stream:  # it had started: what came is kept, and the stream ends with the error
        assert answer.status == 200 and answer.text.startswith("tick tick") and "deadline" in answer.error
    else:
        assert answer.status == 504


@pytest.fixture(scope="module")
def waiting_keel(make_settings: Callable[..., Settings], fake: FakeUpstream) -> Iterator[KeelServer]:
    """One concurrent request per tenant (a slot freed shows the call ended), long waits on the upstream."""
    models = {
        "primary": openai_alias(
            fake.openai_base_url, "fake-gpt", first_token_timeout=30, retry=RetryConfig(), timeout=60
        )
    }
    tiers = {"free": TierLimits(requests_per_minute=1000, tokens_per_minute=1_000_000, concurrent_requests=1)}
    with KeelServer(make_settings(models=models, default_model="primary", tiers=tiers)) as server:
        yield server


def _leave_early(server: KeelServer, key: str, stream: bool) -> None:
    body = {"model": "primary", "messages": MESSAGES, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json=body,
            timeout=httpx.Timeout(5, read=0.3),
        )


def _slot_is_free_within_a_second(server: KeelServer, key: str) -> None:
    started = time.monotonic()
    while True:
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "primary", "messages": MESSAGES},
        )
        if response.status_code != 429 or time.monotonic() - started > 1.0:
            break
        time.sleep(0.05)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_leaving_during_backoff_cancels_the_call(
    waiting_keel: KeelServer, make_tenant: Callable[..., Any], fake: FakeUpstream, stream: bool
) -> None:
    key = make_tenant("free").chat_key
    fake.enqueue(Reply(status=503, headers={"Retry-After": "5"}))  # Keel would wait 5 s, then retry
    _leave_early(waiting_keel, key, stream)
    _slot_is_free_within_a_second(waiting_keel, key)
    assert len(fake.requests) == 2  # the 503, then the request that found the slot free; never the retry


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_leaving_while_the_upstream_is_silent_cancels_the_upstream_call(
    waiting_keel: KeelServer, make_tenant: Callable[..., Any], fake: FakeUpstream, stream: bool
) -> None:
    key = make_tenant("free").chat_key
    fake.enqueue(Reply(hang=True))
    _leave_early(waiting_keel, key, stream)
    left = time.monotonic()
    assert fake.wait_for_cancelled(1, timeout=1.0), "the upstream call outlived its client by a second"
    assert time.monotonic() - left < 1.0
    _slot_is_free_within_a_second(waiting_keel, key)
