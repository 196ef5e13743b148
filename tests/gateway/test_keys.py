"""Keys over HTTP: revoke (DELETE, own tenant only), expiry, model lists at creation."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest

from keel.tenants import TenantService
from keel.testing.server import KeelServer


def _admin(keel: KeelServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=keel.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_delete_revokes_a_key_of_the_callers_tenant_at_once(
    keel: KeelServer, make_tenant: Callable[..., Any], make_client: Callable[..., openai.OpenAI]
) -> None:
    owner, stranger = make_tenant(), make_tenant()
    with _admin(keel, owner.admin_key) as admin, _admin(keel, stranger.admin_key) as other:
        created = admin.post("/keys", json={"scope": "chat", "label": "leaked"})
        assert created.status_code == 201, created.text
        key_id, secret = created.json()["id"], created.json()["key"]
        sdk = make_client(keel, secret)
        assert sdk.models.list().data  # works, and is now in the auth cache

        # Another tenant's admin cannot see it: 404, as for a key that does not exist.
        refused = other.delete(f"/keys/{key_id}")
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["param"] == "key_id"
        assert sdk.models.list().data  # still alive
        assert other.delete(f"/keys/{uuid.uuid4()}").status_code == 404
        assert other.delete("/keys/not-a-uuid").status_code == 404

        deleted = admin.delete(f"/keys/{key_id}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"id": key_id, "object": "api_key", "deleted": True}
        # This process forgets it at once: no wait for the auth cache TTL (10 s on the session server).
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()
        assert admin.delete(f"/keys/{key_id}").status_code == 200  # idempotent
        listed = {k["id"]: k for k in admin.get("/keys").json()["data"]}
        assert listed[key_id]["state"] == "revoked" and listed[key_id]["revoked"] is True


def test_a_chat_key_cannot_delete_keys(keel: KeelServer, tenant: Any) -> None:
    with _admin(keel, tenant.admin_key) as admin:
        key_id = admin.get("/keys").json()["data"][0]["id"]
    with _admin(keel, tenant.chat_key) as chat:
        response = chat.delete(f"/keys/{key_id}")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"


def test_an_expired_key_is_refused_even_while_cached(
    keel: KeelServer, on_tenants: Callable[..., Any], tenant: Any, make_client: Callable[..., openai.OpenAI]
) -> None:
    async def short_lived(tenants: TenantService) -> str:
        _, secret = await tenants.create_key(tenant.name, "chat", expires_in=timedelta(seconds=2))
        return secret

    secret: str = on_tenants(short_lived)
    sdk = make_client(keel, secret)
    assert sdk.models.list().data  # cached now, for the session server's 10 s TTL
    time.sleep(2.5)
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "expired_api_key"
    assert "expired at" in caught.value.message
    # The raw envelope, as curl sees it.
    raw = httpx.post(
        f"{keel.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {secret}"},
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert raw.status_code == 401
    assert raw.json()["error"]["type"] == "authentication_error"


def test_keys_created_over_http_carry_expiry_and_models(keel: KeelServer, tenant: Any) -> None:
    with _admin(keel, tenant.admin_key) as admin:
        created = admin.post(
            "/keys", json={"scope": "chat", "expires_in": "90d", "allowed_models": ["fake", " fake"]}
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["allowed_models"] == ["fake"]
        assert abs(body["expires_at"] - (time.time() + 90 * 86_400)) < 60
        assert body["state"] == "active"

        bad = admin.post("/keys", json={"expires_in": "forever"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "expires_in"
        unknown = admin.post("/keys", json={"allowed_models": ["gpt-nope"]})
        assert unknown.status_code == 400 and "gpt-nope" in unknown.json()["error"]["message"]
        assert unknown.json()["error"]["param"] == "allowed_models"

        listed = {k["id"]: k for k in admin.get("/keys").json()["data"]}
        assert listed[body["id"]]["expires_at"] == body["expires_at"]
        assert listed[body["id"]]["allowed_models"] == ["fake"]
