"""Reading audit records back: one request, filtered pages, retention.

A request is found by Keel's request id, or else by the client's own (`client_request_id`, the newest
with it), always within one tenant. Page cursors are opaque: base64 of the last record's time and request
id, nothing a tenant cannot already see (never a global row id, which would tell the traffic of all).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, delete, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.cursor import decode_cursor, encode_cursor
from keel.db.tables import audit_requests

MAX_PAGE = 100


class AuditStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(self, tenant_id: uuid.UUID, request_id: str) -> dict[str, Any] | None:
        """The record with Keel's request id, or else the newest with this client request id; one tenant."""
        query = by_request_id(select(audit_requests), tenant_id, request_id)
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
        after: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
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
            query = query.where(tuple_(table.created_at, table.request_id) < decode_cursor(after))
        query = query.order_by(table.created_at.desc(), table.request_id.desc()).limit(limit + 1)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = encode_cursor(rows[-1].created_at, rows[-1].request_id) if more and rows else None
        return [record_json(r) for r in rows], cursor

    async def tenants_with(self, request_id: str) -> list[uuid.UUID]:
        """Which tenants have a request with this id (for operator tools that span tenants): Keel's own
        ids first, which are unique, so a tenant cannot make one ambiguous by sending it as its own id."""
        table = audit_requests.c
        async with self._engine.connect() as conn:
            for column in (table.request_id, table.client_request_id):
                query = select(table.tenant_id).where(column == request_id).distinct()
                found = [row.tenant_id for row in await conn.execute(query)]
                if found:
                    return found
        return []

    async def prune(self, older_than_days: float) -> int:
        cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(audit_requests).where(audit_requests.c.created_at < cutoff))
        return int(result.rowcount or 0)


def by_request_id(query: Select[Any], tenant_id: uuid.UUID, request_id: str) -> Select[Any]:
    """The query narrowed to the tenant's record with Keel's request id `request_id` or else, the newest
    record with that client request id."""
    table = audit_requests.c
    exact: ColumnElement[bool] = table.request_id == request_id
    return (
        query.where(table.tenant_id == tenant_id, or_(exact, table.client_request_id == request_id))
        .order_by(exact.desc(), table.created_at.desc())
        .limit(1)
    )


def record_json(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.request_id,
        "client_request_id": row.client_request_id,
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
            "estimated": row.usage_estimated,  # no usage arrived: counted from characters
        },
        "latency_ms": row.latency_ms,
        "ttft_ms": row.ttft_ms,
        "stages": row.stages,
        "replay_of": row.replay_of,
        "context": row.context,  # the context decision: message ids sent, summary, tokens; or the call's kind
    }
