"""`keel replay`, `keel audit prune`, `keel tenants update`, and /healthz + /readyz."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from keel.settings import ModelConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


def _wait_recorded(keel: KeelServer, key: str, request_id: str) -> None:
    deadline = time.monotonic() + 10
    while (
        httpx.get(
            f"{keel.base_url}/requests/{request_id}", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        != 200
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_replay_and_prune_from_the_cli(
    client: openai.OpenAI,
    keel: KeelServer,
    tenant: Any,
    fake: FakeUpstream,
    tmp_path: Path,
    keel_cli: Callable[..., subprocess.CompletedProcess[str]],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
) -> None:
    config = tmp_path / "keel.toml"
    config.write_text(f'[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n')
    client_id = f"cli-{uuid.uuid4().hex[:10]}"
    fake.enqueue(Reply(text="the original reply"))
    raw = client.chat.completions.with_raw_response.create(
        model="fake",
        messages=[{"role": "user", "content": "again"}],
        extra_headers={"X-Request-ID": client_id},
    )
    request_id = raw.headers["x-request-id"]  # Keel's own id, unique
    assert request_id != client_id and raw.headers["x-client-request-id"] == client_id
    _wait_recorded(keel, tenant.admin_key, request_id)
    # Another tenant sends the same client id, and Keel's id of the first request as its own: neither
    # makes the operator's `keel replay REQUEST_ID` ambiguous.
    other = make_client(keel, make_tenant().chat_key)
    for copied in (client_id, request_id):
        other.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Request-ID": copied}
        )

    fake.enqueue(Reply(text="the replayed reply"))
    done = keel_cli("replay", request_id)
    assert done.returncode == 0, done.stderr
    assert "the original reply" in done.stdout
    assert "the replayed reply" in done.stdout
    assert "-the original reply" in done.stdout  # the diff
    assert fake.requests[-1].body["messages"] == [{"role": "user", "content": "again"}]
    listing = httpx.get(
        f"{keel.base_url}/requests",
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
        params={"limit": 5},
    ).json()
    assert any(r["replay_of"] == request_id for r in listing["data"])  # recorded, linked

    ambiguous = keel_cli("replay", client_id, check=False)  # a client id two tenants sent
    assert ambiguous.returncode == 1
    assert "ambiguous" in ambiguous.stderr and "x-request-id" in ambiguous.stderr

    missing = keel_cli("replay", "no-such-request", check=False)
    assert missing.returncode == 1
    assert "no recorded request" in missing.stderr

    pruned = keel_cli("audit", "prune", "--older-than", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert "removed" in pruned.stdout
    gone = httpx.get(
        f"{keel.base_url}/requests/{request_id}", headers={"Authorization": f"Bearer {tenant.admin_key}"}
    )
    assert gone.status_code == 404


def test_tenants_update_switches_audit_content(
    make_tenant: Callable[..., Any], tmp_path: Path, keel_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    config = tmp_path / "keel.toml"
    config.write_text("")
    name = make_tenant().name
    done = keel_cli("tenants", "update", name, "--no-audit-content")
    assert done.returncode == 0, done.stderr
    assert "metadata only" in done.stdout
    unknown = keel_cli("tenants", "update", "nobody-" + uuid.uuid4().hex[:6], "--audit-content", check=False)
    assert unknown.returncode == 1


def test_health_and_readiness(
    start_keel: Callable[..., KeelServer], fake: FakeUpstream, make_tenant: Callable[..., Any]
) -> None:
    server = start_keel(
        models={
            "fake": ModelConfig(provider="openai", base_url=fake.openai_base_url),
            "down": ModelConfig(provider="openai", base_url="http://127.0.0.1:9/v1", connect_timeout=1),
        },
        default_model="fake",
    )
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    anonymous = httpx.get(f"{server.url}/readyz", timeout=30)
    assert (anonymous.status_code, anonymous.json()) == (503, {"status": "not ready"})  # no detail
    tenant = make_tenant()
    refused = httpx.get(f"{server.url}/readyz", headers={"Authorization": f"Bearer {tenant.chat_key}"})
    assert refused.status_code == 403
    response = httpx.get(f"{server.url}/readyz", timeout=30, headers=server.admin_headers())
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"]["ok"] is True
    assert checks["write_queue"]["ok"] is True
    assert checks["model:local"]["ok"] is True
    assert checks["model:fake"]["ok"] is True
    assert checks["model:down"]["ok"] is False
    assert "unreachable" in checks["model:down"]["detail"]

    healthy = start_keel(models={"fake": ModelConfig(provider="openai", base_url=fake.openai_base_url)})
    ready = httpx.get(f"{healthy.url}/readyz", timeout=30)
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
