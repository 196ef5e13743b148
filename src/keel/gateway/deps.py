"""Typed dependencies: routes reach the components built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from keel.context import ConversationStore
from keel.db import WriteQueue
from keel.gateway.auth import Authenticator, require_scope
from keel.gateway.chat.service import ChatService
from keel.llm import ModelRegistry
from keel.prompts import FeedbackStore, PromptRegistry
from keel.telemetry import tenant_var
from keel.telemetry.audit_store import AuditStore
from keel.telemetry.metrics import Metrics
from keel.telemetry.readiness import Readiness
from keel.telemetry.replay import Replayer
from keel.tenants import Principal, TenantService


@dataclass(slots=True)
class Components:
    authenticator: Authenticator
    chat: ChatService
    models: ModelRegistry
    conversations: ConversationStore
    tenants: TenantService
    audit: AuditStore
    replayer: Replayer
    readiness: Readiness
    metrics: Metrics
    writes: WriteQueue
    prompts: PromptRegistry
    feedback: FeedbackStore


def _components(request: Request) -> Components:
    found: Components = request.app.state.keel
    return found


# Dependencies are `async def` even when they never await: FastAPI runs a plain `def` dependency in a
# worker thread, which costs a thread hand-off per request.
async def components(request: Request) -> Components:
    return _components(request)


async def principal(request: Request) -> Principal:
    who = await _components(request).authenticator.authenticate(
        request.headers.get("authorization"), request.headers.get("x-api-key")
    )
    tenant_var.set(who.tenant)
    return who


async def admin_principal(who: Annotated[Principal, Depends(principal)]) -> Principal:
    require_scope(who, "admin")
    return who


PrincipalDep = Annotated[Principal, Depends(principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
ComponentsDep = Annotated[Components, Depends(components)]
