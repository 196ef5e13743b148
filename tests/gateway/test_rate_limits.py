"""Per-tenant tier limits through the gateway: exact in-process, and shared through the real Redis."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from keel.settings import TierLimits
from keel.testing import FakeUpstream, Reply, TcpProxy
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


def _ledger_row(database_url: str, request_id: str) -> asyncpg.Record:
    """The usage row, once the write queue has flushed it."""

    async def poll() -> asyncpg.Record:
        conn = await asyncpg.connect(database_url)
        try:
            deadline = time.monotonic() + 10
            while True:
                row = await conn.fetchrow("SELECT * FROM usage_ledger WHERE request_id = $1", request_id)
                if row is not None:
                    return row
                assert time.monotonic() < deadline, f"no usage row for {request_id}"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    return asyncio.run(poll())


def test_a_client_that_leaves_mid_stream_is_charged_for_what_it_read(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    database_url: str,
    fake: FakeUpstream,
) -> None:
    server = start_keel(tiers=_tiers(tpm=60_000))  # refills 1,000 tokens a second
    keys = make_tenant("free")
    pieces = ["x" * 100] * 400  # 40,000 characters, about 10,000 tokens; usage would come at the end
    fake.enqueue(Reply(text="".join(pieces), chunks=pieces, chunk_delay=0.01))
    read = 0
    with httpx.stream(
        "POST",
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {keys.chat_key}"},
        json={"model": "fake", "messages": MESSAGES, "stream": True},
        timeout=30,
    ) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                read += len(orjson.loads(line[6:])["choices"][0]["delta"].get("content") or "")
            if read >= 20_000:
                break  # half of it, then leave
    assert fake.wait_for_cancelled(1, timeout=2.0)
    row = _ledger_row(database_url, request_id)
    assert row["estimated"] is True
    assert read // 4 <= row["output_tokens"] < 10_000  # what was streamed, about four characters a token
    assert row["input_tokens"] > 0
    raw = make_client_raw(server, keys.chat_key)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 60_000 - 5_000 + 2_000  # 2 s of refill slack


def make_client_raw(server: KeelServer, key: str) -> httpx.Response:
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake", "messages": MESSAGES},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def test_the_token_estimate_counts_tool_definitions(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
) -> None:
    server = start_keel(tiers=_tiers(tpm=2_000))
    client = make_client(server, make_tenant("free").chat_key)
    tool: Any = {
        "type": "function",
        "function": {"name": "lookup", "description": "d" * 8_000, "parameters": {"type": "object"}},
    }
    with pytest.raises(openai.RateLimitError) as caught:  # ~2,000 tokens of tools and 256 for the reply
        client.chat.completions.create(model="fake", messages=MESSAGES, tools=[tool])
    assert caught.value.code == "request_too_large"
    client.chat.completions.create(model="fake", messages=MESSAGES)  # the refusal took no tokens


def test_requests_over_the_limit_are_refused_before_their_body_is_read(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any]
) -> None:
    server = start_keel(tiers=_tiers(rpm=1))
    key = make_tenant("free").chat_key
    make_client_raw(server, key)
    host, port = server.base_url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: 3000000\r\n\r\n".encode()
            + b'{"model": "fake", "messages": ['  # and the other 3 MB never come
        )
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
    assert b"requests per minute" in answer


def test_replay_spends_the_chat_budget_requests_and_slots(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    database_url: str,
    fake: FakeUpstream,
) -> None:
    server = start_keel(tiers=_tiers(rpm=3, concurrent=1))
    keys = make_tenant("free")
    client = make_client(server, keys.chat_key)
    raw = client.chat.completions.with_raw_response.create(model="fake", messages=MESSAGES)  # 1 of 3
    request_id = raw.headers["x-request-id"]
    _ledger_row(database_url, request_id)  # recorded (polling the audit API would spend its budget)
    fake.enqueue(Reply(delay=1.0))
    replay = threading.Thread(target=_replay, args=(server, keys.admin_key, request_id))  # 2 of 3
    replay.start()
    try:
        deadline = time.monotonic() + 5
        while len(fake.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="concurrent requests"):  # the replay holds the slot
            client.chat.completions.create(model="fake", messages=MESSAGES)
    finally:
        replay.join()
    response = _replay(server, keys.admin_key, request_id)  # 3 of 3
    assert response.status_code == 200, response.text
    assert response.json()["replay"]["usage"]["estimated"] is False
    with pytest.raises(openai.RateLimitError, match="requests per minute"):
        client.chat.completions.create(model="fake", messages=MESSAGES)


def test_a_replay_stops_when_its_client_leaves_and_frees_its_slot(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    database_url: str,
    fake: FakeUpstream,
) -> None:
    server = start_keel(tiers=_tiers(concurrent=1))
    keys = make_tenant("free")
    client = make_client(server, keys.chat_key)
    raw = client.chat.completions.with_raw_response.create(model="fake", messages=MESSAGES)
    request_id = raw.headers["x-request-id"]
    _ledger_row(database_url, request_id)
    fake.enqueue(Reply(hang=True))
    with pytest.raises(httpx.ReadTimeout):
        _replay(server, keys.admin_key, request_id, timeout=0.5)
    assert fake.wait_for_cancelled(1, timeout=2.0), "the replay's upstream call outlived its client"
    deadline = time.monotonic() + 2
    while True:  # the slot is freed as the cancelled replay unwinds
        try:
            client.chat.completions.create(model="fake", messages=MESSAGES)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the replay kept its concurrency slot"
            time.sleep(0.05)


def _replay(server: KeelServer, key: str, request_id: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/requests/{request_id}/replay",
        headers={"Authorization": f"Bearer {key}"},
        timeout=timeout,
    )


@pytest.mark.redis
def test_slots_come_back_when_redis_returns_after_streams_ended_without_it(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    fake: FakeUpstream,
    redis_url: str,
) -> None:
    with TcpProxy("127.0.0.1", 6379) as proxy:
        server = start_keel(tiers=_tiers(concurrent=4), redis_url=f"redis://{proxy.host}:{proxy.port}/0")
        key = make_tenant("free").chat_key
        pieces = [f" w{i}" for i in range(60)]
        for _ in range(4):
            fake.enqueue(Reply(text="".join(pieces), chunks=pieces, chunk_delay=0.02))
        started = threading.Barrier(5)
        ended: list[int] = []

        def one_stream() -> None:
            with httpx.stream(
                "POST",
                f"{server.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "fake", "messages": MESSAGES, "stream": True},
                timeout=30,
            ) as response:
                lines = response.iter_lines()
                next(lines)
                started.wait()
                ended.append(sum(1 for _ in lines))

        streams = [threading.Thread(target=one_stream) for _ in range(4)]
        for thread in streams:
            thread.start()
        started.wait(timeout=10)
        proxy.cut()  # Redis goes away while the 4 streams finish: no settle, no release reaches it
        for thread in streams:
            thread.join()
        assert len(ended) == 4
        time.sleep(0.2)
        proxy.restore()
        response = make_client_raw(server, key)  # admitted at once, not after the leases lapse
        assert response.headers["x-ratelimit-limit-requests"] == "1000"
