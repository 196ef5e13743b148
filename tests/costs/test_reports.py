"""Usage reports from the daily rollup, over HTTP and from the CLI; budgets set from the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from keel.settings import ModelConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
def server(start_keel: Callable[..., KeelServer], priced_models: dict[str, ModelConfig]) -> KeelServer:
    return start_keel(models=priced_models)


def _spend(server: KeelServer, client: openai.OpenAI, fake: FakeUpstream, fetch: Any, tenant: Any) -> None:
    """Three calls: priced ($0.0035 each, two users) twice and gpt4o ($0.0035) once; wait for the ledger."""
    fake.default_reply = Reply(text="hi", input_tokens=1000, output_tokens=100)
    client.chat.completions.create(model="priced", messages=MESSAGES, user="ann")
    client.chat.completions.create(model="priced", messages=MESSAGES, user="bob")
    client.chat.completions.create(model="gpt4o", messages=MESSAGES, user="ann")
    fetch("SELECT 1 FROM cost_ledger WHERE tenant_id = $1", tenant.tenant_id, until=lambda r: len(r) == 3)


def test_usage_groups_by_model_user_and_day(
    server: KeelServer, make_tenant: Callable[..., Any], make_client: Any, fake: FakeUpstream, fetch: Any
) -> None:
    tenant = make_tenant()
    _spend(server, make_client(server, tenant.chat_key), fake, fetch, tenant)
    admin = {"Authorization": f"Bearer {tenant.admin_key}"}

    def report(group_by: str) -> dict[str, Any]:
        answer = httpx.get(
            f"{server.base_url}/usage", params={"group_by": group_by}, headers=admin, timeout=10
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    by_model = report("model")
    assert [(d["group"], d["calls"], d["cost_usd"]) for d in by_model["data"]] == [
        ("priced", 2, 0.007),
        ("gpt4o", 1, 0.0035),
    ]
    assert by_model["total_cost_usd"] == pytest.approx(0.0105)
    assert sorted(d["calls"] for d in report("user")["data"]) == [1, 2]
    days = report("day")["data"]
    assert len(days) == 1 and days[0]["input_tokens"] == 3000
    chat_only = httpx.get(f"{server.base_url}/usage", headers={"Authorization": f"Bearer {tenant.chat_key}"})
    assert chat_only.status_code == 403
    bad = httpx.get(f"{server.base_url}/usage", params={"group_by": "colour"}, headers=admin, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


def test_cli_report_and_budgets(
    server: KeelServer,
    make_tenant: Callable[..., Any],
    make_client: Any,
    fake: FakeUpstream,
    fetch: Any,
    keel_cli: Callable[..., Any],
) -> None:
    tenant = make_tenant()
    _spend(server, make_client(server, tenant.chat_key), fake, fetch, tenant)
    done = keel_cli(
        "costs", "report", "--tenant", tenant.name, "--since", "30d", "--by", "model", "--format", "json"
    )
    data = json.loads(done.stdout)["data"]
    assert {d["group"]: d["cost_usd"] for d in data} == {"priced": 0.007, "gpt4o": 0.0035}
    table = keel_cli("costs", "report", "--tenant", tenant.name, "--by", "model").stdout
    assert "priced" in table and "total $0.010500" in table
    csv = keel_cli("costs", "report", "--tenant", tenant.name, "--by", "user", "--format", "csv").stdout
    assert csv.splitlines()[0].startswith("group,calls,")
    out = keel_cli(
        "budgets", "set", "--tenant", tenant.name, "--monthly", "100", "--daily", "10", "--soft", "50,80"
    )
    assert "monthly budget $100.00" in out.stdout and "daily budget $10.00" in out.stdout
    listed = keel_cli("budgets", "list", "--tenant", tenant.name).stdout
    assert "soft 50,80" in listed and listed.count("\n") == 2
    costs = server.components.costs
    assert costs is not None
    deadline = time.monotonic() + 2
    while not costs.has_budgets(tenant.tenant_id):  # the running server picks the CLI's change up
        assert time.monotonic() < deadline
        time.sleep(0.05)
