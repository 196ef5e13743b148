"""Prometheus metrics as a scraper sees them: a real Keel, real requests, `GET /metrics` parsed."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.settings import ModelConfig, RetryConfig, TierLimits
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

CHAT = "/v1/chat/completions"
# Every route label a scrape may show: templates, never raw paths.
ROUTES = {
    CHAT,
    "/v1/models",
    "/v1/conversations/{conversation_id}",
    "/healthz",
    "/readyz",
    "/metrics",
    "unmatched",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    response = httpx.get(url, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include these (0 when there are none)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def _present(samples: Samples, name: str) -> bool:
    return any(sample == name for sample, _ in samples)


def _one_attempt_models(fake: FakeUpstream) -> dict[str, ModelConfig]:
    """No retries: each failed call is exactly one failed attempt."""
    config = ModelConfig(
        provider="openai", base_url=fake.openai_base_url, model="fake-gpt", retry=RetryConfig(attempts=1)
    )
    return {"fake": config}


def _chat(client: openai.OpenAI, request_id: str, model: str = "fake", *, stream: bool = False) -> None:
    messages: Any = [{"role": "user", "content": "Hi there."}]
    headers = {"X-Request-ID": request_id}
    if stream:
        for _ in client.chat.completions.create(
            model=model, messages=messages, stream=True, extra_headers=headers
        ):
            pass
    else:
        client.chat.completions.create(model=model, messages=messages, extra_headers=headers)


def test_requests_move_the_metric_families_with_bounded_labels(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[[KeelServer, str], openai.OpenAI],
    fake: FakeUpstream,
) -> None:
    one_a_minute = TierLimits(requests_per_minute=1, tokens_per_minute=1_000_000, concurrent_requests=10)
    keel = start_keel(tiers={"free": one_a_minute}, models=_one_attempt_models(fake), default_model="fake")
    paying, free = make_tenant(), make_tenant("free")
    client, free_client = make_client(keel, paying.chat_key), make_client(keel, free.chat_key)
    ids = [f"metrics-{uuid.uuid4().hex[:10]}" for _ in range(5)]

    fake.enqueue(Reply(input_tokens=11, output_tokens=3), Reply(input_tokens=11, output_tokens=3))
    _chat(client, ids[0])
    _chat(free_client, ids[1], stream=True)
    with pytest.raises(openai.RateLimitError):
        _chat(free_client, ids[2])
    with pytest.raises(openai.NotFoundError):
        _chat(client, ids[3], model="no-such-model")
    fake.enqueue(Reply(status=500))
    with pytest.raises(openai.InternalServerError) as failed:
        _chat(client, ids[4])
    assert failed.value.status_code == 502
    assert httpx.get(f"{keel.url}/v1/nope/123").status_code == 404

    samples = _scrape(f"{keel.url}/metrics", keel.admin_headers())

    requests = "keel_http_requests_total"
    assert _value(samples, requests, route=CHAT, method="POST", status="200") == 2
    assert _value(samples, requests, route=CHAT, method="POST", status="429") == 1
    assert _value(samples, requests, route=CHAT, method="POST", status="404") == 1
    assert _value(samples, requests, route=CHAT, method="POST", status="502") == 1
    assert _value(samples, requests, route="unmatched", method="GET", status="404") == 1
    assert _value(samples, "keel_http_request_duration_seconds_count", route=CHAT) == 5
    assert _value(samples, "keel_http_request_duration_seconds_sum", route=CHAT) > 0

    llm = {"model": "fake", "provider": "openai"}
    assert _value(samples, "keel_llm_requests_total", **llm, outcome="success") == 2
    failures = _value(samples, "keel_llm_requests_total", **llm) - 2
    assert failures == 1
    assert _value(samples, "keel_llm_request_duration_seconds_count", **llm) == 3
    assert _value(samples, "keel_llm_time_to_first_token_seconds_count", **llm) == 2
    assert _value(samples, "keel_llm_tokens_total", model="fake", direction="input") == 22
    assert _value(samples, "keel_llm_tokens_total", model="fake", direction="output") == 6
    assert _value(samples, "keel_rate_limited_total", tier="free", kind="requests") == 1
    assert _value(samples, "keel_gateway_overhead_seconds_count") >= 2
    assert _present(samples, "keel_write_queue_depth")
    assert _value(samples, "keel_write_queue_depth") >= 0
    assert _present(samples, "keel_write_queue_dropped_total")
    assert _value(samples, "keel_write_queue_dropped_total") == 0

    # Bounded labels only: no request ids, tenants or raw paths, whatever the traffic was.
    forbidden = {*ids, "/v1/nope/123", "no-such-model"}
    for tenant in (paying, free):
        forbidden |= {str(tenant.tenant_id), tenant.name}
    for (name, labels), _ in samples.items():
        for key, value in labels:
            assert value not in forbidden, (name, key, value)
            assert not any(secret in value for secret in forbidden), (name, key, value)
            if key == "route":
                assert value in ROUTES, (name, value)


def test_metrics_can_be_turned_off(start_keel: Callable[..., KeelServer]) -> None:
    keel = start_keel(metrics_enabled=False)
    assert httpx.get(f"{keel.url}/metrics").status_code == 404
    assert httpx.get(f"{keel.url}/healthz").status_code == 200


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_metrics_on_their_own_port(start_keel: Callable[..., KeelServer]) -> None:
    port = _free_port()
    keel = start_keel(metrics_port=port)
    assert httpx.get(f"{keel.url}/healthz").status_code == 200
    assert httpx.get(f"{keel.url}/metrics").status_code == 404
    samples = _scrape(f"http://127.0.0.1:{port}/metrics")
    assert _value(samples, "keel_http_requests_total", route="/healthz", method="GET", status="200") == 1
