"""The composed stack of `ModelRegistry.get(alias)`, driven directly (no gateway): what the observability
layer hears, how deployments share the load, the concurrency limit, and the deadline it sets itself."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from keel.errors import UpstreamTimeoutError
from keel.llm import Attempt, ChatRequest, ChatResult, ModelRegistry
from keel.llm.http import HttpClient
from keel.llm.resilience import CLOSED, HALF_OPEN, OPEN
from keel.settings import BreakerConfig, DeploymentConfig, Settings
from keel.testing import FakeUpstream, Reply, unused_base_url

from ._support import MESSAGES, openai_alias


class Heard:
    """An LLMObserver that writes down what it hears."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.events: list[tuple[Any, ...]] = []

    def attempt_finished(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    def retried(self, model: str, reason: str) -> None:
        self.events.append(("retried", model, reason))

    def fell_back(self, from_model: str, to_model: str) -> None:
        self.events.append(("fell_back", from_model, to_model))

    def breaker_changed(self, deployment: str, state: int) -> None:
        self.events.append(("breaker", deployment, state))


@pytest_asyncio.fixture
async def session() -> AsyncIterator[HttpClient]:
    client = HttpClient()
    yield client
    await client.aclose()


async def registry(session: HttpClient, heard: Heard, **models: Any) -> ModelRegistry:
    settings = Settings(models=models, default_model=next(iter(models)))
    built = ModelRegistry(settings, session, observer=heard)
    await built.start()
    return built


async def complete(models: ModelRegistry, alias: str) -> tuple[ChatResult, ChatRequest]:
    request = ChatRequest(model=alias, messages=MESSAGES)
    result = ChatResult()
    async for event in models.get(alias).stream(request):
        result.add(event)
    return result, request


@pytest.mark.asyncio
async def test_the_observer_hears_attempts_retries_fallbacks_and_breakers(
    session: HttpClient, fake: FakeUpstream, backup: FakeUpstream
) -> None:
    heard = Heard()
    breaker = BreakerConfig(consecutive_failures=3, cooldown=30)
    models = await registry(
        session,
        heard,
        primary=openai_alias(fake.openai_base_url, "fake-gpt", fallbacks=["backup"], breaker=breaker),
        backup=openai_alias(backup.openai_base_url, "backup-gpt"),
    )
    fake.default_reply = Reply(status=503)
    result, request = await complete(models, "primary")

    assert result.text == "Hello from FakeUpstream."
    assert heard.events == [
        ("retried", "primary", "overloaded"),
        ("retried", "primary", "overloaded"),
        ("breaker", "primary", OPEN),
        ("fell_back", "primary", "backup"),
    ]
    assert [(a.model, a.deployment, a.status, a.error_type) for a in heard.attempts] == [
        ("primary", "primary", 503, "overloaded"),
        ("primary", "primary", 503, "overloaded"),
        ("primary", "primary", 503, "overloaded"),
        ("backup", "backup", None, None),
    ]
    assert all(a.latency > 0 for a in heard.attempts) and heard.attempts[-1].first_token is not None
    trace = request.trace
    assert trace.attempts == heard.attempts
    assert (trace.answered_by, trace.deployment, trace.upstream_model, trace.fallback) == (
        "backup",
        "backup",
        "backup-gpt",
        True,
    )
    assert trace.deadline is not None  # no gateway here: the stack set the alias's own


@pytest.mark.asyncio
async def test_breaker_events_cover_the_probe(
    session: HttpClient, fake: FakeUpstream, backup: FakeUpstream
) -> None:
    heard = Heard()
    breaker = BreakerConfig(consecutive_failures=1, cooldown=0.2)
    models = await registry(
        session,
        heard,
        primary=openai_alias(fake.openai_base_url, "fake-gpt", fallbacks=["backup"], breaker=breaker),
        backup=openai_alias(backup.openai_base_url, "backup-gpt"),
    )
    fake.enqueue(Reply(status=500))
    await complete(models, "primary")
    await asyncio.sleep(0.25)
    _, request = await complete(models, "primary")
    assert request.trace.answered_by == "primary"
    assert [e for e in heard.events if e[0] == "breaker"] == [
        ("breaker", "primary", OPEN),
        ("breaker", "primary", HALF_OPEN),
        ("breaker", "primary", CLOSED),
    ]


@pytest.mark.asyncio
async def test_deployments_share_the_load_by_weight_and_cover_for_each_other(
    session: HttpClient, fake: FakeUpstream, backup: FakeUpstream
) -> None:
    deployments = [
        DeploymentConfig(name="east", base_url=fake.openai_base_url, weight=3),
        DeploymentConfig(name="west", base_url=backup.openai_base_url, model="west-gpt", weight=1),
        DeploymentConfig(name="down", base_url=unused_base_url(), weight=1),
    ]
    heard = Heard()
    models = await registry(session, heard, gpt=openai_alias("", "gpt", deployments=deployments))
    answered: Counter[str] = Counter()
    for _ in range(60):
        result, request = await complete(models, "gpt")
        assert result.text and request.trace.answered_by == "gpt" and not request.trace.fallback
        answered[request.trace.deployment or ""] += 1
    assert set(answered) == {"east", "west"}  # "down" refuses connections; another took over at once
    assert answered["east"] > answered["west"]
    assert {r.body["model"] for r in backup.requests} == {"west-gpt"}

    fake.default_reply = Reply(status=401)  # east's key is wrong now: west answers, no fallback needed
    for _ in range(5):
        result, request = await complete(models, "gpt")
        assert request.trace.deployment == "west"


@pytest.mark.asyncio
async def test_the_concurrency_limit_queues_within_the_deadline(
    session: HttpClient, fake: FakeUpstream
) -> None:
    models = await registry(
        session,
        Heard(),
        one=openai_alias(
            fake.openai_base_url, "fake-gpt", max_concurrent=1, timeout=0.8, first_token_timeout=5
        ),
    )
    fake.default_reply = Reply(delay=0.25)
    started = time.monotonic()
    await asyncio.gather(complete(models, "one"), complete(models, "one"))
    assert time.monotonic() - started >= 0.5  # one after the other, both within the deadline
    fake.default_reply = Reply(delay=0.6)
    outcomes = await asyncio.gather(complete(models, "one"), complete(models, "one"), return_exceptions=True)
    assert sum(isinstance(o, UpstreamTimeoutError) for o in outcomes) == 1  # the second ran out of time


def test_deployments_inherit_from_their_alias_and_need_unique_names() -> None:
    alias = openai_alias(
        "http://a.example/v1",
        "gpt",
        headers={"x-team": "core"},
        deployments=[
            DeploymentConfig(base_url="http://b.example/v1", headers={"x-region": "b"}),
            DeploymentConfig(name="c", model="gpt-c", api_key_env="C_KEY"),
        ],
    )
    resolved = {name: config for name, _, config in alias.deployment_configs("gpt")}
    assert list(resolved) == ["gpt/1", "c"]
    assert resolved["gpt/1"].upstream_base_url() == "http://b.example/v1"
    assert resolved["gpt/1"].headers == {"x-team": "core", "x-region": "b"}
    assert resolved["gpt/1"].resolved_api_key() == "sk-upstream-secret-0123456789"
    assert (resolved["c"].upstream_base_url(), resolved["c"].model) == ("http://a.example/v1", "gpt-c")
    assert resolved["c"].api_key is None and resolved["c"].api_key_env == "C_KEY"

    twice = [DeploymentConfig(name="x"), DeploymentConfig(name="x")]
    with pytest.raises(ValueError, match="'x' is used twice"):
        Settings(models={"gpt": openai_alias("http://a/v1", "gpt", deployments=twice)}, default_model="gpt")
    with pytest.raises(ValueError, match="local provider takes no deployments"):
        Settings(models={"local": {"provider": "local", "deployments": [{"name": "y"}]}})
