"""Every call that consumed tokens is a ledger row in micro-dollars; the answer says what it cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import genai_prices
import httpx
import openai
import pytest

from keel.settings import ModelConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
LEDGER = "SELECT * FROM cost_ledger WHERE request_id = $1"


@pytest.fixture
def server(start_keel: Callable[..., KeelServer], priced_models: dict[str, ModelConfig]) -> KeelServer:
    return start_keel(models=priced_models)


def test_a_json_answer_has_the_cost_header_and_field_and_one_ledger_row(
    server: KeelServer, make_tenant: Callable[..., Any], fake: FakeUpstream, fetch: Any
) -> None:
    tenant = make_tenant()
    fake.enqueue(Reply(text="hello", input_tokens=1000, cached_input_tokens=200, output_tokens=100))
    answer = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "priced", "messages": MESSAGES, "user": "u1"},
        headers={"Authorization": f"Bearer {tenant.chat_key}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-keel-cost-usd"] == "0.003250"  # 800 x 2.5 + 200 x 1.25 + 100 x 10 µ$
    assert answer.json()["cost"] == 0.00325
    rows = fetch(LEDGER, answer.headers["x-request-id"])
    assert len(rows) == 1
    row = rows[0]
    assert (row["cost_micros"], row["price_source"], row["alias"], row["upstream_model"]) == (
        3250,
        "keel.toml",
        "priced",
        "fake-gpt",
    )
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]) == (1000, 200, 100)
    assert row["tenant_id"] == tenant.tenant_id and row["key_id"] is not None
    assert row["end_user"] not in (None, "u1")  # hashed, as in the audit record


def test_a_stream_carries_the_cost_beside_the_usage_in_its_last_chunk(
    server: KeelServer, make_tenant: Callable[..., Any], make_client: Any, fake: FakeUpstream
) -> None:
    client: openai.OpenAI = make_client(server, make_tenant().chat_key)
    fake.enqueue(Reply(text="one two three", input_tokens=1000, output_tokens=100))
    chunks = list(
        client.chat.completions.create(
            model="gpt4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.usage is not None and last.usage.prompt_tokens == 1000
    assert last.model_extra is not None and last.model_extra["cost"] == 0.0035  # 1000 x 2.5 + 100 x 10
    assert all("cost" not in (chunk.model_extra or {}) for chunk in chunks[:-1])


def test_anthropic_costs_come_from_genai_prices_with_cache_reads_apart(
    server: KeelServer, make_tenant: Callable[..., Any], make_client: Any, fake: FakeUpstream, fetch: Any
) -> None:
    client: openai.OpenAI = make_client(server, make_tenant().chat_key)
    fake.enqueue(Reply(text="hi", input_tokens=1000, cached_input_tokens=200, output_tokens=100))
    raw = client.chat.completions.with_raw_response.create(model="claude", messages=MESSAGES)
    assert raw.headers["x-keel-cost-usd"] == "0.003960"  # 800 x 3 + 200 x 0.30 + 100 x 15 µ$
    row = fetch(LEDGER, raw.headers["x-request-id"])[0]
    assert row["price_source"] == f"genai-prices@{genai_prices.__version__}"
    assert (row["provider"], row["cost_micros"]) == ("anthropic", 3960)


def test_an_unpriced_model_answers_without_a_cost_and_is_recorded_at_zero(
    server: KeelServer, make_tenant: Callable[..., Any], make_client: Any, fake: FakeUpstream, fetch: Any
) -> None:
    client: openai.OpenAI = make_client(server, make_tenant().chat_key)
    fake.enqueue(Reply(text="hi", input_tokens=10, output_tokens=5))
    raw = client.chat.completions.with_raw_response.create(model="fake", messages=MESSAGES)
    assert raw.headers["x-keel-cost-usd"] == "0.000000"
    row = fetch(LEDGER, raw.headers["x-request-id"])[0]
    assert (row["cost_micros"], row["price_source"]) == (0, "unpriced")


def test_retries_cost_only_the_attempt_that_answered(
    server: KeelServer, make_tenant: Callable[..., Any], make_client: Any, fake: FakeUpstream, fetch: Any
) -> None:
    client: openai.OpenAI = make_client(server, make_tenant().chat_key)
    fake.enqueue(Reply(status=503), Reply(text="ok", input_tokens=1000, output_tokens=0))
    raw = client.chat.completions.with_raw_response.create(model="priced", messages=MESSAGES)
    assert raw.headers["x-keel-attempts"] == "2"
    rows = fetch(LEDGER, raw.headers["x-request-id"])
    assert [(r["attempt"], r["cost_micros"]) for r in rows] == [(2, 2500)]


def test_the_metric_counts_dollars_by_tier_and_alias(
    server: KeelServer, make_tenant: Callable[..., Any], make_client: Any, fake: FakeUpstream
) -> None:
    client: openai.OpenAI = make_client(server, make_tenant("pro").chat_key)
    fake.enqueue(Reply(text="hi", input_tokens=1000, output_tokens=100))
    client.chat.completions.create(model="priced", messages=MESSAGES)
    metrics = httpx.get(f"{server.url}/metrics", headers=server.admin_headers(), timeout=10).text
    line = next(
        m for m in metrics.splitlines() if m.startswith('keel_cost_usd_total{alias="priced",tier="pro"}')
    )
    assert float(line.split()[-1]) == pytest.approx(0.0035)
