"""A bounded, batched background writer: how Keel writes off the request's critical path.

Rows wait in memory (bounded by `max_size`) and are written in batches, one transaction per batch, with
PostgreSQL's binary COPY (asyncpg's `copy_records_to_table`): about 10x less CPU per row than an
executemany INSERT through SQLAlchemy, which compiles and binds every row (docs/performance.md).

A batch goes out when `batch_size` rows wait, when a row was put `urgent` (a conversation reply, which the
next turn reads), when someone waits in `flush()`, or `linger` seconds after its first row: at low load
one transaction carries many requests' audit rows instead of one each.

A row may come with a `prepare` function (the audit record's redaction): it runs in `executor` just before
the row's first write attempt, so CPU-heavy work on a row never holds the event loop. `keel serve` gives a
one-process pool: a thread would still hold the GIL through each regex call and stall the loop (a 1 MB
adversarial body: /healthz at up to 60 ms from a thread, ~10 ms from a process). Without one, or when the
pool breaks, it runs in a thread. `prepare` must be picklable (a module-level function or a partial of
one). A row whose `prepare` raises is logged and dropped (`rejected`).

If PostgreSQL is unreachable the batch is retried with backoff and rows keep waiting. A batch that
PostgreSQL refuses for its data (SQLSTATE class 22 or 23: a NUL byte in a JSON string, a conversation
deleted meanwhile), or that holds a value JSON cannot encode, is split until the offending rows are alone;
a lone row with NUL characters is written again with them replaced by U+FFFD (the audit record of a
request that held one is kept, not lost); other refused rows are logged and dropped (`rejected`), the rest
written. When the queue is full `put` does not drop the row: it reports False so the caller can write it
itself. `close()` drains what is left, bounded by a deadline, and logs anything it could not write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor
from typing import Any

import asyncpg
import orjson
from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

Row = dict[str, Any]
Prepare = Callable[[Row], Row]
# A row with more text than this is prepared (redacted) in the executor's process; below it, a thread here
# does it in well under a millisecond, which is cheaper than pickling the row to another process.
SMALL_ROW_CHARS = 8_192
_DATA_ERRORS = ("22", "23")  # SQLSTATE classes: data exception, integrity constraint violation


class WriteQueue:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_size: int = 10_000,
        batch_size: int = 200,
        linger: float = 0.1,
        executor: Executor | None = None,
    ) -> None:
        self._engine = engine
        self._executor = executor  # None: the loop's default thread pool
        self._max_size = max_size
        self._batch_size = batch_size
        self._linger = linger
        self._pending: deque[tuple[Table, Row, Prepare | None]] = deque()
        self._wakeup = asyncio.Event()
        self._now = asyncio.Event()  # write without lingering
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._encoders: dict[tuple[Table, tuple[str, ...]], Callable[[Row], tuple[Any, ...]]] = {}
        self._held: AsyncConnection | None = None  # the writer's own connection, kept between batches
        self.written = 0
        self.failures = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keel-write-queue")

    def put(self, table: Table, row: Row, *, urgent: bool = False, prepare: Prepare | None = None) -> bool:
        """Queue one row. False when full or closed: the caller must write it another way.

        `prepare(row)`, when given, returns the row to write; it runs in a worker thread, later."""
        if self._closing or len(self._pending) >= self._max_size:
            return False
        self._pending.append((table, row, prepare))
        if self._idle.is_set():
            self._idle.clear()
            self._wakeup.set()
        if urgent or len(self._pending) >= self._batch_size:
            self._now.set()
        return True

    async def flush(self) -> None:
        """Wait until everything queued so far is written (tests, shutdown, a conversation's next turn)."""
        if not self._idle.is_set():
            self._now.set()
            await self._idle.wait()

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a drain deadline, not a call timeout
        self._closing = True
        self._wakeup.set()
        self._now.set()
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.error("write queue: %d rows not written at shutdown (database unreachable?)", len(self))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._release()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._now.is_set() and self._linger > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._now.wait(), self._linger)
            self._now.clear()
            count = min(self._batch_size, len(self._pending))
            if any(self._pending[i][2] is not None for i in range(count)):
                await self._prepare(count)
            batch = [(table, row) for table, row, _ in (self._pending[i] for i in range(count)) if row]
            try:
                await self._write_or_split(batch)
            except Exception:  # a dead database must not kill the writer: rows wait and retry
                self.failures += 1
                await self._release(broken=True)
                log.exception("write queue: batch of %d failed; retrying in %.1fs", len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)  # retrying once a second is cheap; recovery stays quick
                self._now.set()  # the rows have waited long enough
                continue
            delay = 0.1
            for _ in range(count):
                self._pending.popleft()
            if len(self._pending) >= self._batch_size:
                self._now.set()

    async def _prepare(self, count: int) -> None:
        """Run the `prepare` of the first `count` rows off the loop; a row whose `prepare` fails becomes
        empty: dropped, never written unprepared.

        One hop to a thread of this process per batch: there small rows (the usual ones) are prepared,
        a few short regex calls each, no pickling, and their size is counted there too, not on the loop.
        Only rows carrying more than SMALL_ROW_CHARS of text go on to `executor` (a process of its own),
        where a long scan cannot hold this process's GIL."""
        index: list[int] = []
        work: list[tuple[Row, Prepare]] = []
        for i in range(count):
            _, row, prepare = self._pending[i]
            if prepare is not None:
                index.append(i)
                work.append((row, prepare))
        loop = asyncio.get_running_loop()
        limit = None if self._executor is None else SMALL_ROW_CHARS
        done = await loop.run_in_executor(None, prepared_rows, work, limit)
        large = [k for k, result in enumerate(done) if result is None]
        if large:
            try:
                moved = await loop.run_in_executor(self._executor, prepared_rows, [work[k] for k in large])
            except BrokenExecutor:  # its process died (killed, out of memory): go on in a thread
                log.exception(
                    "write queue: the prepare process broke; preparing rows in a thread from now on"
                )
                self._executor = None
                moved = await loop.run_in_executor(None, prepared_rows, [work[k] for k in large])
            for k, result in zip(large, moved, strict=True):
                done[k] = result
        for i, result in zip(index, done, strict=True):
            assert result is not None  # every large row came back from the second hop
            prepared, error = result
            table, row, _ = self._pending[i]  # only _run pops: the first `count` are still these
            if error is not None:
                self.rejected += 1
                log.error(
                    "write queue: preparing a %s row (request %s) failed; dropped: %s",
                    table.name,
                    row.get("request_id"),
                    error,
                )
            self._pending[i] = (table, prepared, None)

    async def _write_or_split(self, batch: list[tuple[Table, Row]]) -> None:
        """Write the batch; when PostgreSQL refuses its data, halve it until the bad rows are alone."""
        try:
            await self._write(batch)
        except (asyncpg.PostgresError, TypeError) as exc:  # TypeError: a value JSON cannot encode
            if isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate)[:2] not in _DATA_ERRORS:
                raise
            if len(batch) == 1:
                table, row = batch[0]
                clean = without_nul(row)
                if clean != row:  # a NUL no PostgreSQL text holds: keep the record, mark the spot
                    log.warning(
                        "write queue: a %s row (request %s) held NUL characters; stored as U+FFFD",
                        table.name,
                        row.get("request_id"),
                    )
                    await self._write_or_split([(table, clean)])
                    return
                self.rejected += 1
                log.error(
                    "write queue: PostgreSQL refused a %s row (request %s) and it was dropped: %s",
                    table.name,
                    row.get("request_id"),
                    exc,
                )
                return
            middle = len(batch) // 2
            await self._write_or_split(batch[:middle])
            await self._write_or_split(batch[middle:])
            return
        self.written += len(batch)

    async def _write(self, batch: list[tuple[Table, Row]]) -> None:
        if not batch:
            return
        by_table: dict[tuple[Table, tuple[str, ...]], list[Row]] = defaultdict(list)
        for table, row in batch:
            by_table[table, tuple(row)].append(row)
        driver = await self._driver()
        async with driver.transaction():
            for (table, columns), rows in by_table.items():
                encode = self._encoder(table, columns)
                await driver.copy_records_to_table(
                    table.name,
                    records=[encode(row) for row in rows],
                    columns=columns,
                    schema_name=table.schema,
                )

    async def _driver(self) -> asyncpg.Connection:
        """The asyncpg connection under the writer's own pooled connection. Kept, not checked out per
        batch: at low load the checkout's ping and reset cost more than the COPY."""
        if self._held is None:
            self._held = await self._engine.connect()
        raw = await self._held.get_raw_connection()
        driver: asyncpg.Connection = raw.driver_connection  # type: ignore[assignment]
        return driver

    async def _release(self, *, broken: bool = False) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        try:
            if broken:
                await held.invalidate()  # never back into the pool
            await held.close()
        except Exception:  # already dead: nothing more to release
            log.debug("write queue: closing its connection failed", exc_info=True)

    def _encoder(self, table: Table, columns: tuple[str, ...]) -> Callable[[Row], tuple[Any, ...]]:
        """Row dict → COPY record. JSON columns go as JSON text (the connection's codec takes text)."""
        key = (table, columns)
        encoder = self._encoders.get(key)
        if encoder is None:
            json_columns = {c.name for c in table.columns if isinstance(c.type, JSON | JSONB)}
            json_at = [i for i, name in enumerate(columns) if name in json_columns]
            # One C call for the values in column order (a generator over the columns costs twice as
            # much, and this runs for every row written); then only the JSON columns are touched.
            values: Callable[[Row], tuple[Any, ...]] = (
                operator.itemgetter(*columns) if len(columns) > 1 else _one(columns[0])
            )

            def encoder(row: Row) -> tuple[Any, ...]:
                if not json_at:
                    return values(row)
                record = list(values(row))
                for i in json_at:
                    if record[i] is not None:
                        record[i] = _json(record[i])
                return tuple(record)

            self._encoders[key] = encoder
        return encoder


def text_size(value: Any, limit: int = SMALL_ROW_CHARS) -> int:
    """Characters of the strings in `value` (nested dicts and lists), counted until past `limit`.
    A loop, not recursion: ~30 % cheaper on an audit row, and no depth limit."""
    total = 0
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            total += len(item)
            if total > limit:
                break
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return total


def prepared_rows(
    work: list[tuple[Row, Prepare]], limit: int | None = None
) -> list[tuple[Row, str | None] | None]:
    """In the executor: each row's `prepare` applied; ({}, the error) for a row where it raised; None,
    not prepared, for a row with more than `limit` characters of text (when a limit is given)."""
    done: list[tuple[Row, str | None] | None] = []
    for row, prepare in work:
        if limit is not None and text_size(row, limit) > limit:
            done.append(None)
            continue
        try:
            done.append((prepare(row), None))
        except Exception as exc:  # reported by the writer, in the server's log
            done.append(({}, f"{type(exc).__name__}: {exc}"))
    return done


def without_nul(value: Any) -> Any:
    """The value with every NUL in its strings (dict keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    if isinstance(value, tuple):
        return tuple(without_nul(v) for v in value)
    return value


def _one(name: str) -> Callable[[Row], tuple[Any, ...]]:
    """A one-column row's record (`itemgetter` with one name gives the value, not a tuple)."""
    return lambda row: (row[name],)


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
