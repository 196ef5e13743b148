"""Scenario 16: 200 concurrent requests while a fifth of the primary's answers are faults."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from keel.testing import FakeUpstream, RecordedRequest, Reply
from keel.testing.server import KeelServer

from ._support import openai_alias

CONCURRENCY = 200
DEADLINE = 8.0  # seconds, sent as X-Keel-Timeout
FAULTS = [  # each strikes before the first token, so each can be retried or fallen back from
    Reply(status=500),
    Reply(status=503, headers={"retry-after-ms": "50"}),
    Reply(status=429, headers={"Retry-After": "0"}),
    Reply(status=529),
    Reply(reset=True),
    Reply(hang=True),
    Reply(stall_after=1),
    Reply(malformed="json"),
    Reply(malformed="sse"),
    Reply(delay=0.05, status=502),
]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """Upstreams of their own that close idle connections soon, so that every socket can be counted back."""
    with FakeUpstream(keepalive_timeout=0.5) as primary, FakeUpstream(keepalive_timeout=0.5) as backup:
        yield primary, backup


def open_sockets(ports: set[int]) -> int:
    """This process's TCP sockets with an end on one of `ports` (the database pool's are not counted)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                ends = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
                count += inode in mine and bool(ends & ports)
    return count


async def burst(server: KeelServer, key: str, stream: bool) -> list[tuple[bool, float, str | None]]:
    """CONCURRENCY requests at once: (answered in full, seconds taken, answering model) for each."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    messages: Any = [{"role": "user", "content": "Hi"}]
    headers = {"X-Keel-Timeout": str(DEADLINE)}
    async with (
        httpx.AsyncClient(limits=limits, timeout=30) as http,
        openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0, http_client=http) as client,
    ):

        async def one() -> tuple[bool, float, str | None]:
            started = time.monotonic()
            text, model = "", None
            try:
                if stream:
                    chunks = await client.chat.completions.create(
                        model="primary", messages=messages, stream=True, extra_headers=headers
                    )
                    async for chunk in chunks:
                        model = chunk.model
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                else:
                    completion = await client.chat.completions.create(
                        model="primary", messages=messages, extra_headers=headers
                    )
                    text, model = completion.choices[0].message.content or "", completion.model
            except openai.APIError:
                return False, time.monotonic() - started, None
            return text == "Hello from FakeUpstream.", time.monotonic() - started, model

        return await asyncio.gather(*(one() for _ in range(CONCURRENCY)))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_16_two_hundred_concurrent_requests_with_a_fifth_faulty_all_answered(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    upstreams: tuple[FakeUpstream, FakeUpstream],
    stream: bool,
) -> None:
    primary, backup = upstreams
    models = {
        "primary": openai_alias(primary.openai_base_url, "fake-gpt", fallbacks=["backup"]),
        "backup": openai_alias(backup.openai_base_url, "backup-gpt"),
    }
    server = start_keel(models=models, default_model="primary")
    key = make_tenant().chat_key
    ports = {server.port, primary.port, backup.port}
    baseline = open_sockets(ports)  # the three listening sockets

    rng = random.Random(16)
    faults = 0

    def faulty(request: RecordedRequest) -> Reply | None:
        nonlocal faults
        if rng.random() < 0.2:
            faults += 1
            return rng.choice(FAULTS)
        return None

    primary.responder = faulty
    results = asyncio.run(burst(server, key, stream))

    assert faults >= 0.15 * CONCURRENCY
    assert all(ok for ok, _, _ in results), f"{sum(not ok for ok, _, _ in results)} requests not answered"
    assert max(seconds for _, seconds, _ in results) < DEADLINE
    assert {model for _, _, model in results} <= {"primary", "backup"}
    assert primary.wait_until_idle(2.0) and backup.wait_until_idle(2.0), "an abandoned upstream call hangs on"
    deadline = time.monotonic() + 5
    while open_sockets(ports) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_sockets(ports) == baseline, f"{open_sockets(ports)} sockets open, {baseline} before the load"
