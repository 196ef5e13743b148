"""The resilience layer's events reach Prometheus: retries, fallbacks and breaker state move on /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from keel.settings import BreakerConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

from ._support import MESSAGES, openai_alias


def _samples(server: KeelServer, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for metric in text_string_to_metric_families(
        httpx.get(f"{server.url}/metrics", headers=server.admin_headers()).text
    ):
        for sample in metric.samples:
            if sample.name == family:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_retries_fallbacks_and_breaker_state_are_exported(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    fake: FakeUpstream,
    backup: FakeUpstream,
) -> None:
    breaker = BreakerConfig(consecutive_failures=2, min_calls=100, cooldown=60)
    server = start_keel(
        models={
            "main": openai_alias(fake.openai_base_url, "main-model", fallbacks=["spare"], breaker=breaker),
            "spare": openai_alias(backup.openai_base_url, "spare-model"),
        },
        default_model="main",
    )
    fake.default_reply = Reply(status=503)
    key = make_tenant().chat_key
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "main", "messages": MESSAGES},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["x-keel-model"] == "spare"

    retries = _samples(server, "keel_llm_retries_total")
    assert sum(v for labels, v in retries.items() if ("model", "main") in labels) >= 1
    fallbacks = _samples(server, "keel_llm_fallbacks_total")
    assert fallbacks[(("from_model", "main"), ("to_model", "spare"))] == 1
    states = _samples(server, "keel_circuit_breaker_state")
    assert 2 in {v for labels, v in states.items() if any("main" in value for _, value in labels)}
    outcomes = _samples(server, "keel_llm_requests_total")
    assert any(("outcome", "success") in labels and ("model", "spare") in labels for labels in outcomes)
    assert sum(v for labels, v in outcomes.items() if ("model", "main") in labels) >= 2
