"""Costs over HTTP (admin scope, the key's tenant only): `/v1/usage` reports, `/v1/budgets`, and the
tenant's own prices (`/v1/prices`). The same operations as `keel costs ...` and `keel budgets ...`.
A change applies on this replica at once and on every other within `costs.refresh_seconds`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from keel.costs import CostTracker, UsageReports
from keel.costs.budgets import Hold, window
from keel.costs.reports import default_window, parse_day
from keel.errors import InvalidRequestError, NotFoundError
from keel.gateway.deps import AdminDep, ComponentsDep

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetBody(_Body):
    period: str = Field(pattern="^(day|month)$")
    limit_usd: float = Field(ge=0)
    key_id: uuid.UUID | None = None  # None: the whole tenant
    per_end_user: bool = False
    soft_percents: list[int] = Field(default_factory=list, max_length=10)


class PriceBody(_Body):
    input: float = Field(ge=0)  # USD per million tokens
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)


def _costs(keel: ComponentsDep) -> CostTracker:
    if keel.costs is None:
        raise NotFoundError("Cost tracking is off on this server (costs.enabled = false).")
    return keel.costs


@router.get("/v1/usage")
async def usage(
    principal: AdminDep,
    keel: ComponentsDep,
    start: Annotated[str | None, Query()] = None,
    end: Annotated[str | None, Query()] = None,
    group_by: Annotated[str, Query()] = "day",
) -> dict[str, Any]:
    """Spend by day, model, key, user or prompt over UTC days [start, end); default: this month."""
    reports: UsageReports | None = keel.reports
    if reports is None:
        raise NotFoundError("Cost tracking is off on this server (costs.enabled = false).")
    first, after = default_window()
    first = parse_day(start, "start") if start else first
    after = parse_day(end, "end") if end else after
    lines = await reports.report(principal.tenant_id, first, after, group_by)
    return {
        "object": "usage_report",
        "start": first.isoformat(),
        "end": after.isoformat(),
        "group_by": group_by,
        "data": [line.as_json() for line in lines],
        "total_cost_usd": sum(line.cost_micros for line in lines) / 1_000_000,
    }


@router.get("/v1/budgets")
async def list_budgets(principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    costs = _costs(keel)
    now = datetime.now(UTC)
    data = []
    for budget in await costs.store.list_budgets(principal.tenant_id):
        start, resets = window(budget.period, now)
        entry = budget.as_json() | {"window_start": start.isoformat(), "resets_at": resets.isoformat()}
        if not budget.per_end_user:
            spent, reserved = await costs.store.usage(Hold(budget, start, "", resets))
            entry |= {"spent_usd": spent / 1_000_000, "reserved_usd": reserved / 1_000_000}
        data.append(entry)
    return {"object": "list", "data": data}


@router.post("/v1/budgets")
async def set_budget(body: BudgetBody, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    costs = _costs(keel)
    if body.key_id is not None and body.key_id not in await _key_ids(keel, principal.tenant):
        raise NotFoundError(f"no key {body.key_id} in this tenant", param="key_id")
    budget = await costs.store.set_budget(
        principal.tenant_id,
        body.period,
        body.limit_usd,
        key_id=body.key_id,
        per_end_user=body.per_end_user,
        soft_percents=body.soft_percents,
    )
    await costs.reload()
    return budget.as_json()


@router.delete("/v1/budgets/{budget_id}")
async def delete_budget(budget_id: uuid.UUID, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    costs = _costs(keel)
    await costs.store.delete_budget(principal.tenant_id, budget_id)
    await costs.reload()
    return {"id": str(budget_id), "deleted": True}


@router.get("/v1/prices")
async def list_prices(principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    """The price each alias has for this tenant, and where it comes from."""
    costs = _costs(keel)
    data = []
    for alias in sorted(info.alias for info in keel.models.info()):
        price = costs.prices.price(principal.tenant_id, alias)
        data.append({"alias": alias, "price": price.as_json() if price else None})
    return {"object": "list", "data": data}


@router.put("/v1/prices/{alias}")
async def set_price(alias: str, body: PriceBody, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    costs = _costs(keel)
    if alias not in {info.alias for info in keel.models.info()}:
        raise InvalidRequestError(f"unknown model alias {alias!r}", param="alias")
    await costs.store.set_price(principal.tenant_id, alias, body.input, body.output, body.cached_input)
    await costs.reload()
    price = costs.prices.price(principal.tenant_id, alias)
    return {"alias": alias, "price": price.as_json() if price else None}


@router.delete("/v1/prices/{alias}")
async def delete_price(alias: str, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    costs = _costs(keel)
    await costs.store.delete_price(principal.tenant_id, alias)
    await costs.reload()
    return {"alias": alias, "deleted": True}


async def _key_ids(keel: ComponentsDep, tenant: str) -> set[uuid.UUID]:
    return {key.id for key in await keel.tenants.list_keys(tenant)}
