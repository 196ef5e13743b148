"""Typed dependencies: routes reach the components built once in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from keel.context import ConversationCatalog, ConversationStore
from keel.costs import CostTracker, UsageReports
from keel.db import WriteQueue
from keel.gateway.auth import Authenticator, require_scope
from keel.gateway.chat.service import ChatService
from keel.llm import ModelRegistry
from keel.prompts import FeedbackStore, PromptRegistry
from keel.ratelimit import RateLimiter
from keel.settings import TierLimits
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
    catalog: ConversationCatalog  # conversations as a product API: list, read, update, delete, export
    tenants: TenantService
    audit: AuditStore
    replayer: Replayer
    readiness: Readiness
    metrics: Metrics
    writes: WriteQueue
    prompts: PromptRegistry
    feedback: FeedbackStore
    limiter: RateLimiter | None = None  # the chat route's, through ChatService; None: limits are off
    tiers: Mapping[str, TierLimits] | None = None
    costs: CostTracker | None = None  # prices, budgets (keel.costs); None: cost tracking is off
    reports: UsageReports | None = None


def _components(request: Request) -> Components:
    found: Components = request.app.state.keel
    return found


# Dependencies are `async def` even when they never await: FastAPI runs a plain `def` dependency in a
# worker thread, which costs a thread hand-off per request.
async def components(request: Request) -> Components:
    return _components(request)


async def principal(request: Request) -> Principal:
    who = await _components(request).authenticator.authenticate(
        request.headers.get("authorization"),
        request.headers.get("x-api-key"),
        request.client.host if request.client else None,
    )
    tenant_var.set(who.tenant)
    return who


async def limited_principal(
    who: Annotated[Principal, Depends(principal)], keel: Annotated[Components, Depends(components)]
) -> AsyncIterator[Principal]:
    """Every route with a key, chat apart, spends one request of its tenant's requests per minute and holds
    one of its concurrent-request slots while it runs; past either, a 429 with `Retry-After` before the
    route does any work. Its own bucket (`TENANT/api`, the tier's limits, no tokens) in the limiter chat
    uses, so feedback or admin calls cannot starve the tenant's chat, nor chat them."""
    if keel.limiter is None or keel.tiers is None:
        yield who
        return
    lease = await keel.limiter.acquire(f"{who.tenant_id}/api", keel.tiers[who.tier], 0)
    try:
        yield who
    finally:
        await lease.release()


async def admin_principal(who: Annotated[Principal, Depends(limited_principal)]) -> Principal:
    require_scope(who, "admin")
    return who


PrincipalDep = Annotated[Principal, Depends(limited_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
ComponentsDep = Annotated[Components, Depends(components)]
