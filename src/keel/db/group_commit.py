"""Durable writes that the caller waits for, group-committed across concurrent callers.

The write queue (writer.py) is for rows nobody waits for. Some rows must be committed before the client
is told "done" (a conversation turn's reply, before its last byte): each caller waits for its own row,
but concurrent callers share one transaction. While one transaction is in flight the rows that arrive
wait for it to end and then go together in the next, so at c=32 a commit carries many turns and the cost
per turn falls as load rises (the group commit of databases' own logs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

Row = dict[str, Any]


class GroupCommit:
    def __init__(self, engine: AsyncEngine, table: Table, *, max_batch: int = 500) -> None:
        self._engine = engine
        self._table = table
        self._max_batch = max_batch
        self._pending: list[tuple[Row, asyncio.Future[int]]] = []
        self._task: asyncio.Task[None] | None = None
        self.commits = 0  # transactions, for benches and tests

    async def write(self, row: Row) -> int:
        """Commit `row`; return its id. A caller that is cancelled meanwhile does not cancel the write."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return await asyncio.shield(future)

    async def drain(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                try:
                    async with self._engine.begin() as conn:
                        insert = self._table.insert().returning(
                            self._table.c.id, sort_by_parameter_order=True
                        )
                        results = list((await conn.execute(insert, [row for row, _ in batch])).scalars())
                    self.commits += 1
                except Exception as exc:  # every waiter hears it; the next batch tries again
                    log.warning("group commit of %d %s rows failed: %s", len(batch), self._table.name, exc)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), row_id in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(row_id)
        finally:
            self._task = None
