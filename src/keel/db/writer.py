"""A bounded, batched background writer: how Keel writes off the request's critical path.

Rows wait in memory (bounded by `max_size`) and are inserted in batches, one transaction per batch. If
PostgreSQL is unreachable the batch is retried with backoff and rows keep waiting; when the queue is full
`put` does not drop the row: it reports False so the caller can write it itself. `close()` drains what is
left, bounded by a deadline, and logs anything it could not write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

Row = dict[str, Any]


class WriteQueue:
    def __init__(self, engine: AsyncEngine, *, max_size: int = 10_000, batch_size: int = 200) -> None:
        self._engine = engine
        self._max_size = max_size
        self._batch_size = batch_size
        self._pending: deque[tuple[Table, Row]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0
        self.failures = 0

    def __len__(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keel-write-queue")

    def put(self, table: Table, row: Row) -> bool:
        """Queue one row. False when full or closed: the caller must write it another way."""
        if self._closing or len(self._pending) >= self._max_size:
            return False
        self._pending.append((table, row))
        self._idle.clear()
        self._wakeup.set()
        return True

    async def flush(self) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        await self._idle.wait()

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a drain deadline, not a call timeout
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.error("write queue: %d rows not written at shutdown (database unreachable?)", len(self))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.1
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._pending[i] for i in range(min(self._batch_size, len(self._pending)))]
            try:
                await self._write(batch)
            except Exception:  # a dead database must not kill the writer: rows wait and retry
                self.failures += 1
                log.exception("write queue: batch of %d failed; retrying in %.1fs", len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)  # retrying once a second is cheap; recovery stays quick
                continue
            delay = 0.1
            for _ in batch:
                self._pending.popleft()
            self.written += len(batch)

    async def _write(self, batch: list[tuple[Table, Row]]) -> None:
        by_table: dict[Table, list[Row]] = defaultdict(list)
        for table, row in batch:
            by_table[table].append(row)
        async with self._engine.begin() as connection:
            for table, rows in by_table.items():
                await connection.execute(table.insert(), rows)
