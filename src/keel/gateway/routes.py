"""The small routes: models, keys (admin), health."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from keel.errors import InvalidRequestError, NotFoundError
from keel.gateway.deps import AdminDep, ComponentsDep, PrincipalDep, admin_principal, principal
from keel.tenants import KeyInfo
from keel.tenants.keys import parse_duration

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. No dependencies checked (that is /readyz)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, keel: ComponentsDep) -> Response:
    """Ready or not, for a load balancer; what each check found only for an admin key (the detail names
    aliases, schema revisions and upstream answers)."""
    ready, checks = await keel.readiness.check()
    body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
    if "authorization" in request.headers or "x-api-key" in request.headers:
        await admin_principal(await principal(request))  # a wrong or chat key: 401 / 403
        body["checks"] = checks
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")


async def metrics(keel: ComponentsDep, _admin: AdminDep) -> Response:
    """On the main port an admin key is needed; `metrics_port` serves them apart, without one."""
    return Response(generate_latest(keel.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(principal: PrincipalDep, keel: ComponentsDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m.alias, "object": "model", "created": 0, "owned_by": m.provider}
            for m in keel.models.info()
            if principal.allows(m.alias)  # only the aliases this key may call
        ],
    }


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    scope: str = "chat"
    label: str = Field(default="", max_length=200)
    expires_in: str | None = Field(default=None, max_length=16, description="e.g. 90d, 12h, 30m, 2w")
    allowed_models: list[str] | None = Field(default=None, max_length=100)


def _key_json(key: KeyInfo, now: datetime) -> dict[str, Any]:
    return {
        "id": str(key.id),
        "object": "api_key",
        "prefix": key.prefix,
        "scope": key.scope,
        "label": key.label,
        "created_at": int(key.created_at.timestamp()),
        "expires_at": int(key.expires_at.timestamp()) if key.expires_at else None,
        "allowed_models": key.allowed_models,
        "state": key.state(now),
        "revoked": key.revoked_at is not None,
        "last_used_at": int(key.last_used_at.timestamp()) if key.last_used_at else None,
    }


@router.get("/v1/keys")
async def list_keys(principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    keys = await keel.tenants.list_keys(principal.tenant)
    now = datetime.now(UTC)
    return {"object": "list", "data": [_key_json(k, now) for k in keys]}


@router.post("/v1/keys", status_code=201)
async def create_key(body: CreateKey, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    try:
        expires_in = parse_duration(body.expires_in) if body.expires_in is not None else None
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="expires_in") from None
    info, secret = await keel.tenants.create_key(
        principal.tenant,
        body.scope,
        body.label,
        expires_in=expires_in,
        allowed_models=body.allowed_models,
    )
    return _key_json(info, datetime.now(UTC)) | {"key": secret}


@router.delete("/v1/keys/{key_id}")
async def delete_key(key_id: str, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    """Revoke a key of the caller's tenant; another tenant's key is a 404, as a missing one is."""
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        parsed = None
    if parsed is None or not await keel.tenants.revoke_id(principal.tenant_id, parsed):
        raise NotFoundError(f"No key {key_id[:64]!r}.", param="key_id")
    keel.authenticator.forget(parsed)  # this process refuses it at once; other replicas within the TTL
    return {"id": str(parsed), "object": "api_key", "deleted": True}
