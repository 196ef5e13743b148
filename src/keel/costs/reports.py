"""Usage reports over the daily rollup (`cost_daily`), never over the ledger itself: a month's report for
a tenant reads about 30 rows per group (day, alias, key, end user, prompt) whatever the number of calls.
The rollup is kept by a statement trigger on `cost_ledger` in the same transaction as the rows (migration
0008), so a report counts every written row exactly once. Windows are whole UTC days.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.tables import cost_daily
from keel.errors import InvalidRequestError

GROUPS = {
    "day": cost_daily.c.day,
    "model": cost_daily.c.alias,
    "key": cost_daily.c.key_id,
    "user": cost_daily.c.end_user,
    "prompt": cost_daily.c.prompt,
}


@dataclass(frozen=True, slots=True)
class UsageLine:
    group: str
    calls: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_micros: int

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_micros / 1_000_000,
        }


def parse_day(value: str, param: str) -> date:
    try:
        return (
            datetime.fromisoformat(value).astimezone(UTC).date()
            if "T" in value
            else date.fromisoformat(value)
        )
    except ValueError:
        raise InvalidRequestError(
            f"{param} must be a date (YYYY-MM-DD), not {value[:40]!r}", param=param
        ) from None


def default_window(today: date | None = None) -> tuple[date, date]:
    """This UTC month so far: [first day, tomorrow)."""
    today = today or datetime.now(UTC).date()
    return today.replace(day=1), today + timedelta(days=1)


class UsageReports:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def report(
        self, tenant_id: uuid.UUID, start: date, end: date, group_by: str = "day"
    ) -> list[UsageLine]:
        """Spend of `tenant_id` on days in [start, end), one line per group, largest cost first (by day:
        in date order)."""
        column = GROUPS.get(group_by)
        if column is None:
            raise InvalidRequestError(f"group_by must be one of {', '.join(GROUPS)}", param="group_by")
        if end <= start:
            raise InvalidRequestError("end must be after start", param="end")
        d = cost_daily.c
        cost = func.sum(d.cost_micros)
        query = (
            select(
                column.label("group"),
                func.sum(d.calls),
                func.sum(d.input_tokens),
                func.sum(d.cached_input_tokens),
                func.sum(d.output_tokens),
                cost,
            )
            .where(d.tenant_id == tenant_id, d.day >= start, d.day < end)
            .group_by(column)
            .order_by(column if group_by == "day" else cost.desc())
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            UsageLine(str(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]), int(row[5]))
            for row in rows
        ]
