"""Less exposed by default: /metrics and the detail of /readyz need an admin key; probes are shared."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from keel.settings import DeploymentConfig, ModelConfig
from keel.testing import FakeUpstream
from keel.testing.server import KeelServer


def test_metrics_need_an_admin_key_on_the_main_port(keel: KeelServer, tenant: Any) -> None:
    assert httpx.get(f"{keel.url}/metrics").status_code == 401
    chat = httpx.get(f"{keel.url}/metrics", headers={"Authorization": f"Bearer {tenant.chat_key}"})
    assert chat.status_code == 403
    admin = httpx.get(f"{keel.url}/metrics", headers={"Authorization": f"Bearer {tenant.admin_key}"})
    assert admin.status_code == 200
    assert "keel_http_requests_total" in admin.text


def test_readiness_probes_each_deployment_once_however_many_ask(
    start_keel: Callable[..., KeelServer], fake: FakeUpstream
) -> None:
    split = ModelConfig(
        provider="openai",
        base_url="http://127.0.0.1:9/v1",  # the alias's own URL is never probed: its deployments are
        deployments=[
            DeploymentConfig(name="split/a", base_url=fake.openai_base_url, api_key="key-a"),
            DeploymentConfig(name="split/b", base_url=fake.openai_base_url, api_key="key-b"),
        ],
    )
    server = start_keel(models={"split": split}, default_model="split")
    fake.reset()
    headers = server.admin_headers()

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(client.get(f"{server.url}/readyz", headers=headers) for _ in range(20))
            )

    answers = asyncio.run(many())
    assert {answer.status_code for answer in answers} == {200}
    check = answers[0].json()["checks"]["model:split"]
    assert check["ok"] is True
    assert "split/a: answered 200" in check["detail"] and "split/b: answered 200" in check["detail"]
    probes = [r for r in fake.requests if r.path == "/v1/models"]
    assert sorted(r.headers["authorization"] for r in probes) == ["Bearer key-a", "Bearer key-b"]
