"""End-user feedback on one answer, linked to its request and, through the audit record, its prompt variant.

The audit record is written off the request's critical path, so feedback sent right after an answer may
arrive before it: on a miss the store waits once (`feedback_wait_seconds`) and looks once more, then
answers 404. Two queries at most, never a poll: a flood of unknown ids costs the database two queries
each, and the route's rate limit bounds the flood. Linking at write time keeps feedback tenant-scoped
(a request id of another tenant is never found) and copies the variant, so canary statistics need no
join. Sending feedback again replaces it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.tables import audit_requests, feedback
from keel.errors import InvalidRequestError, NotFoundError
from keel.telemetry.audit_store import by_request_id


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
        request_id, prompt = await self._prompt_of(tenant_id, request_id)  # Keel's id, if sent the client's
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

    async def _prompt_of(self, tenant_id: uuid.UUID, request_id: str) -> tuple[str, dict[str, Any]]:
        query = by_request_id(
            select(audit_requests.c.prompt, audit_requests.c.request_id), tenant_id, request_id
        )
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(self._wait)  # the record may still be in the write queue
            async with self._engine.connect() as conn:
                found = (await conn.execute(query)).one_or_none()
            if found is not None:
                prompt: dict[str, Any] = found.prompt or {}
                return found.request_id, prompt
        # Unknown, or another tenant's: indistinguishable.
        raise NotFoundError(f"No request {request_id[:128]!r}.", param="request_id")
