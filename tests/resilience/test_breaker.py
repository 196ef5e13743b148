"""The circuit breaker: its state machine on a fake clock, then scenario 11 (opens, skips, probes,
recovers) on a real Keel, and scenario 12 (state shared through Redis by two Keels)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from keel.llm.resilience import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from keel.llm.trace import NoObserver
from keel.settings import BreakerConfig, RetryConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

from ._support import ask, openai_alias


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Changes(NoObserver):
    def __init__(self) -> None:
        self.states: list[int] = []

    def breaker_changed(self, deployment: str, state: int) -> None:
        self.states.append(state)


def breaker(**config: Any) -> tuple[CircuitBreaker, Clock, Changes]:
    clock, changes = Clock(), Changes()
    values = {"min_calls": 4, "failure_ratio": 0.5, "consecutive_failures": 3, "cooldown": 10, "window": 30}
    return CircuitBreaker("d", BreakerConfig(**(values | config)), changes, clock=clock), clock, changes


def call(b: CircuitBreaker, healthy: bool | None) -> bool:
    probe = b.acquire()
    if probe is None:
        return False
    b.record(probe, healthy)
    return True


def test_opens_on_consecutive_failures() -> None:
    b, _, changes = breaker()
    for _ in range(2):
        call(b, False)
    assert b.state == CLOSED
    call(b, False)
    assert b.state == OPEN and changes.states == [OPEN]
    assert not b.available() and b.acquire() is None


def test_opens_on_the_failure_ratio_only_past_the_minimum_of_calls() -> None:
    b, _, _ = breaker(consecutive_failures=100, min_calls=6)
    for healthy in (True, False, True, False, True):
        call(b, healthy)
    assert b.state == CLOSED  # 2 of 5 failed, and 5 calls are fewer than the minimum
    call(b, False)
    assert b.state == OPEN  # 3 of 6


def test_old_calls_leave_the_window() -> None:
    b, clock, _ = breaker(consecutive_failures=100, min_calls=4, window=10)
    for healthy in (False, False, True):
        call(b, healthy)
    clock.now += 11  # those three are forgotten
    for healthy in (True, False, True):
        call(b, healthy)
    assert b.state == CLOSED
    call(b, False)
    assert b.state == OPEN  # 2 of the last 4


def test_cooldown_then_one_probe_closes_or_reopens() -> None:
    b, clock, changes = breaker()
    for _ in range(3):
        call(b, False)
    clock.now += 9.9
    assert b.acquire() is None  # still cooling down
    clock.now += 0.2
    assert b.available()
    probe = b.acquire()
    assert probe is True and b.state == HALF_OPEN
    assert b.acquire() is None and not b.available()  # one probe at a time
    b.record(probe, False)
    assert b.state == OPEN and b.acquire() is None  # a failed probe: another full cooldown
    clock.now += 10.1
    probe = b.acquire()
    assert probe is True
    b.record(probe, None)  # tells nothing (the client left): still half-open, the next call probes
    assert b.state == HALF_OPEN
    probe = b.acquire()
    assert probe is True
    b.record(probe, True)
    assert b.state == CLOSED and b.acquire() is False
    assert changes.states == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]
    call(b, False)
    call(b, False)
    assert b.state == CLOSED  # closing forgot the earlier failures


def test_requests_the_upstream_rightly_refused_are_neither_health_nor_sickness() -> None:
    b, _, _ = breaker()
    for _ in range(10):
        call(b, None)
    assert b.state == CLOSED


BREAKER = BreakerConfig(min_calls=20, consecutive_failures=3, cooldown=0.5, window=30)
ONCE = RetryConfig(attempts=1, wait=False)  # one attempt per request: the counts below are requests


def _breaker_models(name: str, fake: FakeUpstream, backup: FakeUpstream) -> dict[str, Any]:
    return {
        name: openai_alias(
            fake.openai_base_url, "fake-gpt", fallbacks=["backup"], breaker=BREAKER, retry=ONCE
        ),
        "backup": openai_alias(backup.openai_base_url, "backup-gpt"),
    }


def test_11_breaker_opens_skips_probes_and_lets_traffic_return(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
    backup: FakeUpstream,
) -> None:
    server = start_keel(models=_breaker_models("primary", fake, backup), default_model="primary")
    client = make_client(server, make_tenant().chat_key)
    fake.default_reply = Reply(status=500)
    for stream in (False, True, False):  # three failures in a row: the threshold
        assert ask(client, "primary", stream=stream).model == "backup"
    assert len(fake.requests) == 3

    for stream in (False, True):  # open: skipped at once, no attempt on it at all
        answer = ask(client, "primary", stream=stream)
        assert (answer.model, answer.attempts) == ("backup", 1)
    assert len(fake.requests) == 3

    time.sleep(0.6)  # the cooldown: one probe, which fails, and the breaker opens again
    assert ask(client, "primary", stream=False).attempts == 2
    assert len(fake.requests) == 4
    assert ask(client, "primary", stream=True).attempts == 1
    assert len(fake.requests) == 4

    fake.default_reply = Reply(text="primary is back")
    time.sleep(0.6)
    for stream in (True, False, True):  # the probe succeeds, and traffic returns
        answer = ask(client, "primary", stream=stream)
        assert (answer.model, answer.text, answer.attempts) == ("primary", "primary is back", 1)
    assert len(fake.requests) == 7


@pytest.mark.redis
def _breaker_open_on(server: KeelServer) -> bool:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers=server.admin_headers()).text
    return any(
        sample.value == 2
        for family in text_string_to_metric_families(text)
        if family.name == "keel_circuit_breaker_state"
        for sample in family.samples
    )


def test_12_breaker_state_is_shared_through_redis(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    redis_url: str,
    fake: FakeUpstream,
    backup: FakeUpstream,
) -> None:
    alias = f"shared-{uuid.uuid4().hex[:8]}"  # its breaker key is fresh in the shared Redis
    shared: dict[str, Any] = {
        "models": _breaker_models(alias, fake, backup),
        "default_model": alias,
        "redis_url": redis_url,
        "breaker_sync_seconds": 0.1,
    }
    first, second = start_keel(**shared), start_keel(**shared)
    key = make_tenant().chat_key
    one, two = make_client(first, key), make_client(second, key)

    fake.default_reply = Reply(status=500)
    for _ in range(3):
        assert ask(one, alias, stream=False).model == "backup"  # the first Keel opens the breaker
    assert len(fake.requests) == 3
    # The second Keel learns it through Redis within a few sync intervals; wait for its own gauge to say so
    # (a fixed sleep is flaky on a loaded machine).
    deadline = time.monotonic() + 10
    while not _breaker_open_on(second):
        assert time.monotonic() < deadline, "the second Keel never saw the breaker open"
        time.sleep(0.05)
    for stream in (False, True):
        answer = ask(two, alias, stream=stream)
        assert (answer.model, answer.attempts) == ("backup", 1)  # the second skips it, never having failed
    assert len(fake.requests) == 3
