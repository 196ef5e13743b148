"""End-user feedback on one answer, linked to its request and, through the audit record, its prompt variant.

The audit record is written off the request's critical path, so feedback sent right after an answer may
arrive before it: the store waits for the record a short while (`feedback_wait_seconds`), then answers
404. Linking at write time keeps feedback tenant-scoped — a request id of another tenant is never found —
and copies the variant, so canary statistics need no join. Sending feedback again replaces it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.tables import audit_requests, feedback
from keel.errors import InvalidRequestError, NotFoundError

POLL_SECONDS = 0.05


def score_value(score: float) -> float:
    """1 and -1 (thumbs) or 0.0-1.0, on one scale from 0.0 (bad) to 1.0 (good)."""
    if score == -1:
        return 0.0
    if 0.0 <= score <= 1.0:
        return float(score)
    raise InvalidRequestError("score must be 1, -1, or between 0.0 and 1.0.", param="score")


class FeedbackStore:
    def __init__(self, engine: AsyncEngine, *, wait_seconds: float = 2.0) -> None:
        self._engine = engine
        self._wait = wait_seconds

    async def add(
        self, tenant_id: uuid.UUID, request_id: str, score: float, comment: str | None
    ) -> dict[str, Any]:
        value = score_value(score)
        prompt = await self._prompt_of(tenant_id, request_id)
        row = {
            "tenant_id": tenant_id,
            "request_id": request_id,
            "score": score,
            "value": value,
            "comment": comment,
            "prompt": prompt,
        }
        upsert = insert(feedback).values(**row)
        upsert = upsert.on_conflict_do_update(
            index_elements=["tenant_id", "request_id"],
            set_={"score": score, "value": value, "comment": comment, "created_at": func.now()},
        )
        async with self._engine.begin() as conn:
            await conn.execute(upsert)
        return {
            "object": "feedback",
            "request_id": request_id,
            "score": score,
            "comment": comment,
            "prompt": {key: prompt.get(key) for key in ("name", "version", "label", "experiment", "variant")},
        }

    async def _prompt_of(self, tenant_id: uuid.UUID, request_id: str) -> dict[str, Any]:
        query = (
            select(audit_requests.c.prompt)
            .where(audit_requests.c.tenant_id == tenant_id, audit_requests.c.request_id == request_id)
            .order_by(audit_requests.c.id.desc())
            .limit(1)
        )
        deadline = time.monotonic() + self._wait
        while True:
            async with self._engine.connect() as conn:
                found = (await conn.execute(query)).one_or_none()
            if found is not None:
                prompt: dict[str, Any] = found.prompt or {}
                return prompt
            if time.monotonic() >= deadline:  # unknown, or another tenant's: indistinguishable
                raise NotFoundError(f"No request {request_id!r}.", param="request_id")
            await asyncio.sleep(POLL_SECONDS)
