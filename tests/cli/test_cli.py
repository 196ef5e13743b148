"""The `keel` command, run as users run it, against the session's database."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest

from keel.testing.server import KeelServer


def test_tenants_and_keys_lifecycle(
    keel_cli: Callable[..., subprocess.CompletedProcess[str]],
    start_keel: Callable[..., KeelServer],
    make_client: Callable[..., openai.OpenAI],
) -> None:
    name = f"acme-{uuid.uuid4().hex[:6]}"
    assert "tier pro" in keel_cli("tenants", "create", name, "--tier", "pro").stdout
    duplicate = keel_cli("tenants", "create", name, check=False)
    assert duplicate.returncode == 1
    assert "already exists" in duplicate.stderr
    assert name in keel_cli("tenants", "list").stdout

    created = keel_cli("keys", "create", "--tenant", name, "--scope", "chat", "--label", "ci bot")
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-keel-")
    assert len(key) >= len("sk-keel-") + 32

    listing = keel_cli("keys", "list", "--tenant", name).stdout
    assert key[:16] in listing
    assert key not in listing  # the secret is never shown again
    assert "ci bot" in listing and "never" in listing

    server = start_keel(auth_cache_ttl_seconds=0.5, key_usage_flush_seconds=0.2)
    client = make_client(server, key)
    client.models.list()
    time.sleep(0.5)
    assert "never" not in keel_cli("keys", "list", "--tenant", name).stdout  # last-used flushed

    keel_cli("keys", "revoke", key[:16], "--tenant", name)
    deadline = time.monotonic() + 0.5 + 2.0  # the documented TTL, plus slack for a busy machine
    while time.monotonic() < deadline:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a revoked key still worked after the auth cache TTL")
    assert "revoked" in keel_cli("keys", "list", "--tenant", name).stdout


def test_bad_input_gets_a_clear_message(keel_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    unknown = keel_cli("keys", "create", "--tenant", "no-such-tenant", check=False)
    assert unknown.returncode == 1
    assert "no tenant named" in unknown.stderr
    tier = keel_cli("tenants", "create", f"x-{uuid.uuid4().hex[:6]}", "--tier", "platinum", check=False)
    assert tier.returncode == 1
    assert "tier must be one of" in tier.stderr
    short = keel_cli("keys", "revoke", "sk-", check=False)
    assert short.returncode == 1


def test_db_upgrade_is_idempotent(keel_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    assert "up to date" in keel_cli("db", "upgrade").stdout
    assert "up to date" in keel_cli("db", "upgrade").stdout


def test_admin_api_creates_keys_in_its_own_tenant(keel: KeelServer, tenant: Any) -> None:
    import httpx

    response = httpx.post(
        f"{keel.base_url}/keys",
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
        json={"scope": "chat", "label": "from api"},
    )
    assert response.status_code == 201
    new_key = response.json()["key"]
    models = httpx.get(f"{keel.base_url}/models", headers={"Authorization": f"Bearer {new_key}"})
    assert models.status_code == 200


def test_chat_streams_answers_and_keeps_the_conversation(
    keel_cli: Callable[..., subprocess.CompletedProcess[str]], keel: KeelServer, tenant: Any, fake: Any
) -> None:
    from keel.testing import Reply

    fake.enqueue(Reply(text="Hello Ada!", chunks=["Hello", " Ada!"]), Reply(text="You are Ada."))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keel",
            "chat",
            "--base-url",
            keel.base_url,
            "--api-key",
            tenant.chat_key,
            "--model",
            "fake",
            "--conversation",
            "cli-test-1",
        ],
        input="I am Ada.\nWho am I?\n\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Hello Ada!" in done.stdout
    assert "You are Ada." in done.stdout
    # The second turn went upstream with the first one as history: the conversation lives on the server.
    assert [m["content"] for m in fake.requests[-1].body["messages"]] == [
        "I am Ada.",
        "Hello Ada!",
        "Who am I?",
    ]
