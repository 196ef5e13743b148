"""The small routes: models, conversations, keys (admin), health."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from keel.errors import NotFoundError
from keel.gateway.deps import AdminDep, ComponentsDep, PrincipalDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. No dependencies checked (that is /readyz)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(keel: ComponentsDep) -> Response:
    ready, checks = await keel.readiness.check()
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")


async def metrics(keel: ComponentsDep) -> Response:
    return Response(generate_latest(keel.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(principal: PrincipalDep, keel: ComponentsDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m.alias, "object": "model", "created": 0, "owned_by": m.provider}
            for m in keel.models.info()
        ],
    }


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(
    conversation_id: str, principal: PrincipalDep, keel: ComponentsDep
) -> dict[str, Any]:
    found = await keel.conversations.get(principal.tenant_id, conversation_id)
    if found is None:  # another tenant's conversation is indistinguishable from a missing one
        raise NotFoundError(f"No conversation {conversation_id!r}.", param="conversation_id")
    return {
        "id": found.id,
        "object": "conversation",
        "created_at": int(found.created_at.timestamp()),
        "updated_at": int(found.updated_at.timestamp()),
        "messages": found.messages,
    }


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    scope: str = "chat"
    label: str = Field(default="", max_length=200)


@router.get("/v1/keys")
async def list_keys(principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    keys = await keel.tenants.list_keys(principal.tenant)
    return {
        "object": "list",
        "data": [
            {
                "id": str(k.id),
                "prefix": k.prefix,
                "scope": k.scope,
                "label": k.label,
                "created_at": int(k.created_at.timestamp()),
                "revoked": k.revoked_at is not None,
                "last_used_at": int(k.last_used_at.timestamp()) if k.last_used_at else None,
            }
            for k in keys
        ],
    }


@router.post("/v1/keys", status_code=201)
async def create_key(body: CreateKey, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    info, secret = await keel.tenants.create_key(principal.tenant, body.scope, body.label)
    return {
        "id": str(info.id),
        "prefix": info.prefix,
        "scope": info.scope,
        "label": info.label,
        "key": secret,
    }
