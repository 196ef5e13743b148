"""Budgets: reserved before the call, settled after, never overspent under concurrency, across replicas."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from keel.costs.budgets import BudgetStore, Hold, window
from keel.db.engine import create_engine
from keel.settings import CostSettings, ModelConfig, PriceConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
# $1000 per million output tokens, input free: a request with max_tokens=10 reserves exactly $0.01, and a
# reply of 10 tokens costs exactly that.
CENT = {"model": "metered", "messages": MESSAGES, "max_tokens": 10}


@pytest.fixture
def metered(fake: FakeUpstream) -> dict[str, ModelConfig]:
    return {
        "fake": ModelConfig(provider="openai", base_url=fake.openai_base_url, model="fake-gpt"),
        "metered": ModelConfig(
            provider="openai",
            base_url=fake.openai_base_url,
            model="fake-gpt",
            price=PriceConfig(input=0, output=1000),
        ),
    }


@pytest.fixture
def server(start_keel: Callable[..., KeelServer], metered: dict[str, ModelConfig]) -> KeelServer:
    return start_keel(models=metered)


def _admin(server: KeelServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _post_many(server: KeelServer, key: str, count: int, body: dict[str, Any]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=count),
        ) as client:
            return list(
                await asyncio.gather(*(client.post("/chat/completions", json=body) for _ in range(count)))
            )

    return asyncio.run(go())


def _spent(fetch: Any, tenant_id: uuid.UUID) -> tuple[int, int]:
    """(spent, reserved) once every reservation is settled: a request settles after its answer went out,
    so the last ones may still be settling when the client has its 200."""
    deadline = time.monotonic() + 5
    while True:
        rows = fetch(
            "SELECT u.spent, u.reserved FROM budget_usage u JOIN budgets b ON b.id = u.budget_id "
            "WHERE b.tenant_id = $1",
            tenant_id,
        )
        found = (rows[0]["spent"], rows[0]["reserved"]) if rows else (0, 0)
        if found[1] == 0 or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_fifty_parallel_requests_against_a_budget_for_ten_spend_it_exactly(
    server: KeelServer, make_tenant: Callable[..., Any], fake: FakeUpstream, fetch: Any
) -> None:
    tenant = make_tenant()
    with _admin(server, tenant.admin_key) as admin:
        assert admin.post("/budgets", json={"period": "month", "limit_usd": 0.10}).status_code == 200
    fake.default_reply = Reply(text="ten tokens", output_tokens=10, delay=0.2)
    answers = _post_many(server, tenant.chat_key, 50, CENT)
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(ok) == 10  # all that fit are served ...
    assert len(fake.requests) == 10  # ... and the refused never reached the upstream
    assert {a.status_code for a in refused} == {429}
    error = refused[0].json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "monthly budget" in error["message"] and "resets at" in error["message"]
    assert refused[0].headers["x-keel-budget-reset"].endswith("T00:00:00Z")
    assert _spent(fetch, tenant.tenant_id) == (100_000, 0)  # $0.10 exactly, nothing left reserved


def test_two_replicas_share_one_budget_and_a_change_reaches_both_within_a_second(
    start_keel: Callable[..., KeelServer],
    metered: dict[str, ModelConfig],
    make_tenant: Callable[..., Any],
    fake: FakeUpstream,
    fetch: Any,
) -> None:
    one, two = start_keel(models=metered), start_keel(models=metered)
    tenant = make_tenant()
    with _admin(one, tenant.admin_key) as admin:
        admin.post("/budgets", json={"period": "day", "limit_usd": 0.05})
    changed = time.monotonic()
    while two.components.costs is not None and not two.components.costs.has_budgets(tenant.tenant_id):
        assert time.monotonic() - changed < 1.0, "the other replica did not see the budget within 1 s"
        time.sleep(0.02)
    fake.default_reply = Reply(text="ten tokens", output_tokens=10, delay=0.1)
    answers = _post_many(one, tenant.chat_key, 10, CENT) + _post_many(two, tenant.chat_key, 10, CENT)
    assert sum(a.status_code == 200 for a in answers) == 5
    assert _spent(fetch, tenant.tenant_id) == (50_000, 0)


def test_an_unpriced_model_is_refused_for_a_budgeted_tenant_only(
    server: KeelServer, make_tenant: Callable[..., Any]
) -> None:
    budgeted, free = make_tenant(), make_tenant()
    with _admin(server, budgeted.admin_key) as admin:
        admin.post("/budgets", json={"period": "month", "limit_usd": 5})
    body = {"model": "fake", "messages": MESSAGES}
    refused = _post_many(server, budgeted.chat_key, 1, body)[0]
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_priced"
    assert _post_many(server, free.chat_key, 1, body)[0].status_code == 200
    costs = server.components.costs
    assert costs is not None and not costs.has_budgets(free.tenant_id)  # no database trip for it


def test_a_per_user_budget_limits_each_end_user_apart(
    server: KeelServer, make_tenant: Callable[..., Any], fake: FakeUpstream
) -> None:
    tenant = make_tenant()
    with _admin(server, tenant.admin_key) as admin:
        admin.post("/budgets", json={"period": "day", "limit_usd": 0.02, "per_end_user": True})
    fake.default_reply = Reply(text="ten tokens", output_tokens=10)
    codes = [
        _post_many(server, tenant.chat_key, 1, CENT | {"user": user})[0].status_code
        for user in ("ann", "ann", "ann", "bob")
    ]
    assert codes == [200, 200, 429, 200]


def test_a_lease_of_a_dead_replica_is_freed_when_it_expires(
    server: KeelServer, make_tenant: Callable[..., Any], database_url: str
) -> None:
    tenant = make_tenant()
    with _admin(server, tenant.admin_key) as admin:
        budget_id = uuid.UUID(admin.post("/budgets", json={"period": "day", "limit_usd": 1}).json()["id"])

    async def go() -> tuple[tuple[int, int], tuple[int, int]]:
        engine = create_engine(database_url, pool_size=1)
        try:
            store = BudgetStore(engine)
            budget = next(b for b in await store.list_budgets(tenant.tenant_id) if b.id == budget_id)
            start, resets = window("day", datetime.now(UTC))
            hold = Hold(budget, start, "", resets)
            assert await store.reserve(uuid.uuid4(), [hold], 400_000, ttl=0.2) is None  # then "dies"
            held = await store.usage(hold)
            await asyncio.sleep(0.3)
            await store.reap()
            return held, await store.usage(hold)
        finally:
            await engine.dispose()

    held, after = asyncio.run(go())
    assert held == (0, 400_000)
    assert after == (0, 0)


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    _Receiver.received = []
    http = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}/hook", _Receiver.received
    http.shutdown()
    http.server_close()


def test_a_soft_threshold_sends_one_signed_webhook_per_window(
    start_keel: Callable[..., KeelServer],
    metered: dict[str, ModelConfig],
    make_tenant: Callable[..., Any],
    fake: FakeUpstream,
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    import orjson

    from keel.costs.webhooks import verify

    url, received = receiver
    server = start_keel(models=metered, costs=CostSettings(webhook_url=url, webhook_secret="s3cret"))
    tenant = make_tenant()
    with _admin(server, tenant.admin_key) as admin:
        admin.post("/budgets", json={"period": "month", "limit_usd": 0.10, "soft_percents": [30, 50]})
    fake.default_reply = Reply(text="ten tokens", output_tokens=10)
    for _ in range(6):
        assert _post_many(server, tenant.chat_key, 1, CENT)[0].status_code == 200
    deadline = time.monotonic() + 5
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert len(received) == 2  # 30 % and 50 %, once each
    events = [orjson.loads(body) for _, body in received]
    assert sorted(e["percent"] for e in events) == [30, 50]
    assert all(verify("s3cret", headers["x-keel-signature"], body) for headers, body in received)
    assert not verify("other", received[0][0]["x-keel-signature"], received[0][1])
    assert events[0]["tenant"] == tenant.name and events[0]["budget"]["period"] == "month"
