"""Reading audit records back: one request, filtered pages, retention."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.tables import audit_requests

MAX_PAGE = 100


class AuditStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(self, tenant_id: uuid.UUID, request_id: str) -> dict[str, Any] | None:
        """The newest record with this request id, in this tenant only."""
        query = (
            select(audit_requests)
            .where(audit_requests.c.tenant_id == tenant_id, audit_requests.c.request_id == request_id)
            .order_by(audit_requests.c.id.desc())
            .limit(1)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        return record_json(row) if row is not None else None

    async def page(
        self,
        tenant_id: uuid.UUID,
        *,
        conversation_id: str | None = None,
        model: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 20,
        after: int | None = None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first. Returns the records and the cursor of the next page (None at the end)."""
        table = audit_requests.c
        query = select(audit_requests).where(table.tenant_id == tenant_id)
        if conversation_id is not None:
            query = query.where(table.conversation_id == conversation_id)
        if model is not None:
            query = query.where(or_(table.model_requested == model, table.model_answered == model))
        if status is not None:
            query = query.where(table.status == status)
        if since is not None:
            query = query.where(table.created_at >= since)
        if until is not None:
            query = query.where(table.created_at < until)
        if after is not None:
            query = query.where(table.id < after)
        query = query.order_by(table.id.desc()).limit(limit + 1)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return [record_json(r) for r in rows], (rows[-1].id if more and rows else None)

    async def tenants_with(self, request_id: str) -> list[uuid.UUID]:
        """Which tenants have a request with this id (for operator tools that span tenants)."""
        query = select(audit_requests.c.tenant_id).where(audit_requests.c.request_id == request_id).distinct()
        async with self._engine.connect() as conn:
            return [row.tenant_id for row in await conn.execute(query)]

    async def prune(self, older_than_days: float) -> int:
        cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(audit_requests).where(audit_requests.c.created_at < cutoff))
        return int(result.rowcount or 0)


def record_json(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.request_id,
        "object": "keel.request",
        "created_at": row.created_at.isoformat(),
        "trace_id": row.trace_id,
        "end_user": row.end_user,
        "conversation_id": row.conversation_id,
        "prompt": row.prompt,
        "model": {
            "requested": row.model_requested,
            "answered": row.model_answered,
            "deployment": row.deployment,
            "upstream": row.upstream_model,
        },
        "status": row.status,
        "error": row.error,
        "attempts": row.attempts,
        "request": row.request,
        "retrieved": row.retrieved,
        "reply": row.reply,
        "finish_reason": row.finish_reason,
        "usage": {
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "total_tokens": row.input_tokens + row.output_tokens,
        },
        "latency_ms": row.latency_ms,
        "ttft_ms": row.ttft_ms,
        "stages": row.stages,
        "replay_of": row.replay_of,
    }
