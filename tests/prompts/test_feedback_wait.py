"""Feedback for a request id not (yet) in the audit log looks twice, never polls the database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import event

from keel.db.engine import create_engine
from keel.errors import NotFoundError
from keel.prompts import FeedbackStore


def test_an_unknown_request_id_costs_two_queries_and_one_wait(database_url: str, tenant: Any) -> None:
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    async def go() -> float:
        engine = create_engine(database_url, pool_size=1)
        event.listen(engine.sync_engine, "before_cursor_execute", count)
        try:
            store = FeedbackStore(engine, wait_seconds=0.5)
            started = time.monotonic()
            with pytest.raises(NotFoundError):
                await store.add(tenant.tenant_id, "req_none_such", 1, None)
            return time.monotonic() - started
        finally:
            await engine.dispose()

    elapsed = asyncio.run(go())
    assert len([s for s in statements if "audit_requests" in s]) == 2, statements
    assert 0.5 <= elapsed < 2
