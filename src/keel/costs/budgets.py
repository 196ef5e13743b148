"""Budgets in PostgreSQL, the one source of truth every replica shares.

A budget limits a tenant's (or one key's) spend per UTC day or month, optionally per end user (`user`).
Its usage is one row per window and subject ('' or the end user): `spent` and `reserved`.

Reserve, then settle. Before the model call, one statement reserves the request's estimate against every
budget that applies: an upsert whose `DO UPDATE ... WHERE spent + reserved + estimate <= limit` is
evaluated on the row's latest version under its lock, so parallel requests on any number of replicas
can never reserve past the limit together; when one budget refuses, the transaction rolls back and no
budget keeps anything. Each reservation is also a lease row with an expiry. After the call, settling
deletes the lease and moves the real cost into `spent` in one statement. A lease whose replica died is
deleted by any replica's reaper after `expires_at`, which frees its reservation (a settle that comes
later still adds its cost to `spent`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keel.costs.prices import TENANT_OVERRIDE, Price, price_from
from keel.db.tables import budget_alerts, budget_usage, budgets, costs_version, tenant_prices
from keel.errors import InvalidRequestError, NotFoundError, RateLimitError

PERIODS = ("day", "month")


class BudgetExceededError(RateLimitError):
    """429 `insufficient_quota`, as OpenAI answers an exhausted quota: names the budget and its reset."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"


@dataclass(frozen=True, slots=True)
class Budget:
    id: uuid.UUID
    tenant_id: uuid.UUID
    key_id: uuid.UUID | None
    per_end_user: bool
    period: str
    limit_micros: int
    soft_percents: tuple[int, ...] = ()

    def describe(self) -> str:
        scope = f"key {self.key_id.hex[:8]}" if self.key_id else "tenant"
        per = " per end user" if self.per_end_user else ""
        return f"{scope} {'daily' if self.period == 'day' else 'monthly'} budget{per}"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "key_id": str(self.key_id) if self.key_id else None,
            "per_end_user": self.per_end_user,
            "period": self.period,
            "limit_usd": self.limit_micros / 1_000_000,
            "soft_percents": list(self.soft_percents),
        }


def window(period: str, now: datetime) -> tuple[date, datetime]:
    """The UTC calendar window holding `now`: its first day and when it resets."""
    day = now.astimezone(UTC).date()
    if period == "day":
        return day, datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
    start = day.replace(day=1)
    following = (start + timedelta(days=32)).replace(day=1)
    return start, datetime.combine(following, datetime.min.time(), UTC)


@dataclass(frozen=True, slots=True)
class Hold:
    """One budget's part of a reservation."""

    budget: Budget
    window_start: date
    subject: str
    resets: datetime


_RESERVE = text("""
WITH want AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:windows AS date[]), CAST(:subjects AS text[]),
                         CAST(:limits AS bigint[])) AS w(budget_id, window_start, subject, lim)
), took AS (
    INSERT INTO budget_usage AS u (budget_id, window_start, subject, spent, reserved, limit_micros)
    SELECT budget_id, window_start, subject, 0, :amount, lim FROM want WHERE :amount <= lim
    ON CONFLICT (budget_id, window_start, subject) DO UPDATE
        SET reserved = u.reserved + EXCLUDED.reserved, limit_micros = EXCLUDED.limit_micros
        WHERE u.spent + u.reserved + EXCLUDED.reserved <= EXCLUDED.limit_micros
    RETURNING u.budget_id, u.window_start, u.subject
), leased AS (
    INSERT INTO budget_leases (lease_id, budget_id, window_start, subject, amount, expires_at)
    SELECT :lease, budget_id, window_start, subject, :amount, now() + make_interval(secs => :ttl)
    FROM took
    RETURNING budget_id
)
SELECT budget_id FROM leased
""")

_SETTLE = text("""
WITH gone AS (
    DELETE FROM budget_leases WHERE lease_id = :lease
    RETURNING budget_id, window_start, subject, amount
)
UPDATE budget_usage u
SET spent = u.spent + :actual, reserved = GREATEST(0, u.reserved - coalesce(g.amount, 0))
FROM unnest(CAST(:ids AS uuid[]), CAST(:windows AS date[]), CAST(:subjects AS text[]))
     AS w(budget_id, window_start, subject)
LEFT JOIN gone g USING (budget_id, window_start, subject)
WHERE u.budget_id = w.budget_id AND u.window_start = w.window_start AND u.subject = w.subject
RETURNING u.budget_id, u.subject, u.spent
""")

_REAP = text("""
WITH gone AS (
    DELETE FROM budget_leases WHERE expires_at < now()
    RETURNING budget_id, window_start, subject, amount
), sums AS (
    SELECT budget_id, window_start, subject, sum(amount) AS amount FROM gone GROUP BY 1, 2, 3
)
UPDATE budget_usage u SET reserved = GREATEST(0, u.reserved - s.amount)
FROM sums s
WHERE u.budget_id = s.budget_id AND u.window_start = s.window_start AND u.subject = s.subject
RETURNING u.budget_id
""")


class _Refused(Exception):
    pass


def _columns(holds: Sequence[Hold]) -> dict[str, list[Any]]:
    return {
        "ids": [h.budget.id for h in holds],
        "windows": [h.window_start for h in holds],
        "subjects": [h.subject for h in holds],
    }


class BudgetStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # --- the hot path ------------------------------------------------------------------------------

    async def reserve(self, lease: uuid.UUID, holds: Sequence[Hold], amount: int, ttl: float) -> Hold | None:
        """Reserve `amount` micro-dollars against every hold, all or none. None when reserved; else the
        first hold whose budget refused (nothing is kept)."""
        params = _columns(holds) | {
            "limits": [h.budget.limit_micros for h in holds],
            "amount": amount,
            "lease": lease,
            "ttl": ttl,
        }
        try:
            async with self._engine.begin() as conn:
                took = {row[0] for row in await conn.execute(_RESERVE, params)}
                if len(took) != len(holds):
                    raise _Refused
        except _Refused:
            return next(h for h in holds if h.budget.id not in took)
        return None

    async def settle(self, lease: uuid.UUID, holds: Sequence[Hold], actual: int) -> dict[uuid.UUID, int]:
        """Free the reservation, add the real cost: budget id → spent in its window afterwards."""
        params = _columns(holds) | {"lease": lease, "actual": actual}
        async with self._engine.begin() as conn:
            return {row.budget_id: row.spent for row in await conn.execute(_SETTLE, params)}

    async def reap(self) -> int:
        """Free the reservations of expired leases (their replica died or hung); how many budgets."""
        async with self._engine.begin() as conn:
            return len((await conn.execute(_REAP)).all())

    async def usage(self, hold: Hold) -> tuple[int, int]:
        """(spent, reserved) of one budget's window and subject."""
        u = budget_usage.c
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(u.spent, u.reserved).where(
                        u.budget_id == hold.budget.id,
                        u.window_start == hold.window_start,
                        u.subject == hold.subject,
                    )
                )
            ).one_or_none()
        return (row.spent, row.reserved) if row is not None else (0, 0)

    async def alert_once(self, hold: Hold, percent: int) -> bool:
        """Record that `percent` of the budget was crossed in this window: True the first time only."""
        statement = (
            insert(budget_alerts)
            .values(
                budget_id=hold.budget.id,
                window_start=hold.window_start,
                subject=hold.subject,
                percent=percent,
            )
            .on_conflict_do_nothing()
            .returning(budget_alerts.c.percent)
        )
        async with self._engine.begin() as conn:
            return (await conn.execute(statement)).first() is not None

    # --- configuration -----------------------------------------------------------------------------

    async def version(self) -> int:
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(costs_version.c.version))).scalar_one())

    async def load(self) -> tuple[int, list[Budget], dict[tuple[uuid.UUID, str], Price]]:
        """Every budget and tenant price, with the version they belong to (one snapshot)."""
        async with self._engine.begin() as conn:
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            version = int((await conn.execute(select(costs_version.c.version))).scalar_one())
            rows = (await conn.execute(select(budgets))).all()
            prices = (await conn.execute(select(tenant_prices))).all()
        return (
            version,
            [_budget(r) for r in rows],
            {
                (p.tenant_id, p.alias): price_from(p.input, p.cached_input, p.output, TENANT_OVERRIDE)
                for p in prices
            },
        )

    async def set_budget(
        self,
        tenant_id: uuid.UUID,
        period: str,
        limit_usd: float,
        *,
        key_id: uuid.UUID | None = None,
        per_end_user: bool = False,
        soft_percents: Sequence[int] = (),
    ) -> Budget:
        if period not in PERIODS:
            raise InvalidRequestError("period must be 'day' or 'month'", param="period")
        if limit_usd < 0:
            raise InvalidRequestError("a budget's limit must be >= 0 USD", param="limit_usd")
        if any(not 0 < p < 100 for p in soft_percents):
            raise InvalidRequestError("soft thresholds are percents between 1 and 99", param="soft")
        values = {
            "tenant_id": tenant_id,
            "key_id": key_id,
            "per_end_user": per_end_user,
            "period": period,
            "limit_micros": round(limit_usd * 1_000_000),
            "soft_percents": sorted(set(soft_percents)),
        }
        upsert = insert(budgets).values(**values)
        statement = upsert.on_conflict_do_update(
            index_elements=["tenant_id", "key_id", "per_end_user", "period"],
            set_={
                "limit_micros": upsert.excluded.limit_micros,
                "soft_percents": upsert.excluded.soft_percents,
                "updated_at": func.now(),
            },
        ).returning(*budgets.c)
        async with self._engine.begin() as conn:
            row = (await conn.execute(statement)).one()
            await _bump(conn)
        return _budget(row)

    async def list_budgets(self, tenant_id: uuid.UUID) -> list[Budget]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(budgets)
                    .where(budgets.c.tenant_id == tenant_id)
                    .order_by(budgets.c.key_id.nulls_first(), budgets.c.period)
                )
            ).all()
        return [_budget(r) for r in rows]

    async def delete_budget(self, tenant_id: uuid.UUID, budget_id: uuid.UUID) -> None:
        async with self._engine.begin() as conn:
            done = await conn.execute(
                delete(budgets).where(budgets.c.tenant_id == tenant_id, budgets.c.id == budget_id)
            )
            if not done.rowcount:
                raise NotFoundError(f"no budget {budget_id}", param="budget_id")
            await _bump(conn)

    async def set_price(
        self, tenant_id: uuid.UUID, alias: str, input: float, output: float, cached_input: float | None
    ) -> None:
        if min(input, output, cached_input if cached_input is not None else 0) < 0:
            raise InvalidRequestError("prices must be >= 0 USD per million tokens")
        values = {"input": input, "output": output, "cached_input": cached_input}
        statement = insert(tenant_prices).values(tenant_id=tenant_id, alias=alias, **values)
        statement = statement.on_conflict_do_update(
            index_elements=["tenant_id", "alias"], set_=values | {"updated_at": func.now()}
        )
        async with self._engine.begin() as conn:
            await conn.execute(statement)
            await _bump(conn)

    async def delete_price(self, tenant_id: uuid.UUID, alias: str) -> None:
        t = tenant_prices.c
        async with self._engine.begin() as conn:
            done = await conn.execute(delete(tenant_prices).where(t.tenant_id == tenant_id, t.alias == alias))
            if not done.rowcount:
                raise NotFoundError(f"no price of this tenant for {alias!r}", param="alias")
            await _bump(conn)


async def _bump(conn: AsyncConnection) -> None:
    await conn.execute(update(costs_version).values(version=costs_version.c.version + 1))


def _budget(row: Any) -> Budget:
    return Budget(
        row.id,
        row.tenant_id,
        row.key_id,
        row.per_end_user,
        row.period,
        row.limit_micros,
        tuple(row.soft_percents or ()),
    )
