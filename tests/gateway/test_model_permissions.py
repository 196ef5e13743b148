"""Model permissions: `allowed_models` per tier, per tenant and per key, enforced in chat and replay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError

from keel.db.engine import create_engine
from keel.settings import Settings, TierLimits
from keel.tenants import TenantService
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

MESSAGES: Any = [{"role": "user", "content": "Hi"}]


def _with_tenants(database_url: str, action: Callable[[TenantService], Any]) -> Any:
    async def go() -> Any:
        engine = create_engine(database_url, pool_size=1)
        try:
            return await action(TenantService(engine))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _refused(call: Callable[[], object], alias: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        call()
    assert caught.value.status_code == 403
    assert caught.value.code == "model_not_allowed"
    assert alias in caught.value.message
    body: Any = caught.value.body
    assert body["param"] == "model" and body["type"] == "permission_error"


def test_a_tier_list_limits_its_tenants_and_not_the_others(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
) -> None:
    free_limits = TierLimits(
        requests_per_minute=60, tokens_per_minute=40_000, concurrent_requests=4, allowed_models=["fake"]
    )
    server = start_keel(tiers={"free": free_limits})
    free = make_client(server, make_tenant("free").chat_key)
    paying = make_client(server, make_tenant("enterprise").chat_key)

    fake.default_reply = Reply(text="ok")
    assert free.chat.completions.create(model="fake", messages=MESSAGES).choices[0].message.content == "ok"
    upstream_calls = len(fake.requests)
    _refused(lambda: free.chat.completions.create(model="claude", messages=MESSAGES), "claude")
    _refused(lambda: free.chat.completions.create(model="claude", messages=MESSAGES, stream=True), "claude")
    assert len(fake.requests) == upstream_calls  # refused before any upstream call
    assert [m.id for m in free.models.list().data] == ["fake"]  # lists only what it may call

    assert paying.chat.completions.create(model="claude", messages=MESSAGES).choices[0].message.content
    assert {m.id for m in paying.models.list().data} >= {"fake", "claude"}


def test_tenant_and_key_lists_intersect(
    keel: KeelServer,
    database_url: str,
    tenant: Any,
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
) -> None:
    async def restrict(tenants: TenantService) -> tuple[str, str]:
        await tenants.set_allowed_models(tenant.name, ["claude", "fake"])
        _, only_claude = await tenants.create_key(tenant.name, "chat", allowed_models=["claude"])
        _, unlisted = await tenants.create_key(tenant.name, "chat")
        return only_claude, unlisted

    only_claude, unlisted = _with_tenants(database_url, restrict)
    fake.default_reply = Reply(text="ok")
    narrow = make_client(keel, only_claude)
    assert narrow.chat.completions.create(model="claude", messages=MESSAGES).choices[0].message.content
    _refused(lambda: narrow.chat.completions.create(model="fake", messages=MESSAGES), "fake")
    # No model named: the default alias ("fake") is checked too.
    _refused(lambda: narrow.chat.completions.create(model=openai.omit, messages=MESSAGES), "fake")
    wide = make_client(keel, unlisted)  # the tenant's list applies to a key without its own
    assert wide.chat.completions.create(model="fake", messages=MESSAGES).choices[0].message.content

    async def set_tenant_to_claude(tenants: TenantService) -> str:
        await tenants.set_allowed_models(tenant.name, ["claude"])
        _, fresh = await tenants.create_key(tenant.name, "chat", allowed_models=["fake"])
        return fresh

    disjoint = make_client(keel, _with_tenants(database_url, set_tenant_to_claude))
    # Key allows fake, tenant allows claude: the intersection is empty, so nothing may be called.
    _refused(lambda: disjoint.chat.completions.create(model="fake", messages=MESSAGES), "fake")
    _refused(lambda: disjoint.chat.completions.create(model="claude", messages=MESSAGES), "claude")


def test_a_model_chosen_by_a_prompt_is_checked_too(
    keel: KeelServer, database_url: str, tenant: Any, make_client: Callable[..., openai.OpenAI]
) -> None:
    name = f"pick-{uuid.uuid4().hex[:8]}"
    pushed = httpx.post(
        f"{keel.base_url}/prompts",
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
        json={"name": name, "template": "Be brief.", "model": {"alias": "claude"}, "labels": ["production"]},
        timeout=30,
    )
    assert pushed.status_code == 201, pushed.text

    async def fake_only(tenants: TenantService) -> str:
        _, secret = await tenants.create_key(tenant.name, "chat", allowed_models=["fake"])
        return secret

    client = make_client(keel, _with_tenants(database_url, fake_only))
    _refused(
        lambda: client.chat.completions.create(
            model=openai.omit, messages=MESSAGES, extra_body={"prompt": {"name": name}}
        ),
        "claude",
    )


def test_replay_obeys_the_callers_model_list(
    keel: KeelServer, database_url: str, tenant: Any, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    request_id = f"perm-{uuid.uuid4().hex[:10]}"
    fake.default_reply = Reply(text="first")
    client.chat.completions.create(
        model="fake", messages=MESSAGES, extra_headers={"X-Request-ID": request_id}
    )

    async def fake_only_admin(tenants: TenantService) -> str:
        _, secret = await tenants.create_key(tenant.name, "admin", allowed_models=["fake"])
        return secret

    admin = httpx.Client(
        base_url=keel.base_url,
        headers={"Authorization": f"Bearer {_with_tenants(database_url, fake_only_admin)}"},
        timeout=30,
    )
    with admin:
        deadline = time.monotonic() + 10
        while admin.get(f"/requests/{request_id}").status_code == 404:  # written off the critical path
            assert time.monotonic() < deadline, "the audit record never landed"
            time.sleep(0.05)
        calls = len(fake.requests)
        refused = admin.post(f"/requests/{request_id}/replay", json={"model": "claude"})
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["code"] == "model_not_allowed" and "claude" in error["message"]
        assert len(fake.requests) == calls  # nothing went upstream
        again = admin.post(f"/requests/{request_id}/replay", json={"model": "fake"})
        assert again.status_code == 200, again.text


def test_a_tier_may_only_list_configured_aliases() -> None:
    limits = TierLimits(
        requests_per_minute=1, tokens_per_minute=1, concurrent_requests=1, allowed_models=["gpt-nope"]
    )
    with pytest.raises(ValidationError, match="gpt-nope"):
        Settings(tiers={"free": limits})
