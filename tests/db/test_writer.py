"""The background write queue: batches, waits out a locked or unreachable table, drains on close."""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db import WriteQueue
from keel.db.engine import create_engine
from keel.db.tables import conversation_messages, conversations, tenants
from keel.db.writer import SMALL_ROW_CHARS
from keel.testing.server import KeelServer


async def _setup(database_url: str) -> tuple[AsyncEngine, uuid.UUID, str]:
    engine = create_engine(database_url, pool_size=2)
    async with engine.begin() as conn:
        tenant_id = (
            await conn.execute(
                tenants.insert().values(name=f"w-{uuid.uuid4().hex[:8]}", tier="free").returning(tenants.c.id)
            )
        ).scalar_one()
        conversation = f"w-{uuid.uuid4().hex[:8]}"
        await conn.execute(conversations.insert().values(tenant_id=tenant_id, id=conversation))
    return engine, tenant_id, conversation


def _row(tenant_id: uuid.UUID, conversation: str, i: int) -> dict[str, object]:
    message = {"role": "assistant", "content": f"reply {i}"}
    return {
        "tenant_id": tenant_id,
        "conversation_id": conversation,
        "role": "assistant",
        "message": message,
        "request_id": f"req-{i}",
    }


async def _count(engine: AsyncEngine, conversation: str) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).where(conversation_messages.c.conversation_id == conversation)
        return int((await conn.execute(query)).scalar_one())


@pytest.mark.asyncio
async def test_close_drains_everything_queued(database_url: str, keel: KeelServer) -> None:
    engine, tenant_id, conversation = await _setup(database_url)
    queue = WriteQueue(engine, max_size=10_000, batch_size=100)
    queue.start()
    for i in range(3_000):
        assert queue.put(conversation_messages, _row(tenant_id, conversation, i))
    await queue.close(timeout=30)
    assert await _count(engine, conversation) == 3_000
    assert not queue.put(conversation_messages, _row(tenant_id, conversation, -1))  # closed: refuses
    await engine.dispose()


@pytest.mark.asyncio
async def test_full_queue_refuses_instead_of_dropping(database_url: str, keel: KeelServer) -> None:
    engine, tenant_id, conversation = await _setup(database_url)
    queue = WriteQueue(engine, max_size=5, batch_size=5)
    accepted = [queue.put(conversation_messages, _row(tenant_id, conversation, i)) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    queue.start()
    await queue.close(timeout=10)
    assert await _count(engine, conversation) == 5
    await engine.dispose()


@pytest.mark.asyncio
async def test_rows_wait_while_the_table_is_locked_and_land_after(
    database_url: str, keel: KeelServer
) -> None:
    engine, tenant_id, conversation = await _setup(database_url)
    queue = WriteQueue(engine, batch_size=50)
    queue.start()
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE conversation_messages IN ACCESS EXCLUSIVE MODE")
    for i in range(200):
        queue.put(conversation_messages, _row(tenant_id, conversation, i))
    await asyncio.sleep(0.5)
    assert len(queue) > 0  # waiting, not lost
    await transaction.rollback()
    await blocker.close()
    await asyncio.wait_for(queue.flush(), 10)
    assert await _count(engine, conversation) == 200
    await queue.close()
    await engine.dispose()


@pytest.mark.asyncio
async def test_a_row_postgresql_refuses_is_dropped_alone(database_url: str, keel: KeelServer) -> None:
    """A reply to a conversation that no longer exists (a foreign-key violation) goes; the batch around
    it lands."""
    engine, tenant_id, conversation = await _setup(database_url)
    queue = WriteQueue(engine, batch_size=100)
    for i in range(50):
        row = _row(tenant_id, conversation, i)
        if i in (7, 31):
            row["conversation_id"] = f"deleted-{uuid.uuid4().hex[:8]}"
        queue.put(conversation_messages, row)
    queue.start()
    await asyncio.wait_for(queue.flush(), 10)
    assert await _count(engine, conversation) == 48
    assert queue.rejected == 2
    assert queue.failures == 0  # refused data is not an outage: no retry loop
    await queue.close()
    await engine.dispose()


@pytest.mark.asyncio
async def test_nul_characters_are_stored_as_replacement_characters(
    database_url: str, keel: KeelServer
) -> None:
    """A NUL is valid JSON but no jsonb or text value holds it: the row is kept with U+FFFD in its place,
    in JSON strings, JSON keys and plain text columns alike."""
    engine, tenant_id, conversation = await _setup(database_url)
    queue = WriteQueue(engine, batch_size=100)
    for i in range(20):
        row = _row(tenant_id, conversation, i)
        if i == 5:
            row["message"] = {"role": "assistant", "content": ["bad \u0000 byte"], "k\u0000": 1}
            row["request_id"] = "req-\u0000"
        queue.put(conversation_messages, row)
    queue.start()
    await asyncio.wait_for(queue.flush(), 10)
    assert await _count(engine, conversation) == 20
    assert queue.rejected == 0
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                select(conversation_messages.c.message, conversation_messages.c.request_id).where(
                    conversation_messages.c.request_id.like("req-\ufffd%")
                )
            )
        ).one()
    assert stored.message == {"role": "assistant", "content": ["bad \ufffd byte"], "k\ufffd": 1}
    assert stored.request_id == "req-\ufffd"
    await queue.close()
    await engine.dispose()


@pytest.mark.asyncio
async def test_rows_linger_for_a_batch_unless_urgent_or_flushed(database_url: str, keel: KeelServer) -> None:
    engine, tenant_id, conversation = await _setup(database_url)
    queue = WriteQueue(engine, batch_size=100, linger=30.0)
    queue.start()
    queue.put(conversation_messages, _row(tenant_id, conversation, 0))
    await asyncio.sleep(0.3)
    assert await _count(engine, conversation) == 0  # waiting for company
    queue.put(conversation_messages, _row(tenant_id, conversation, 1), urgent=True)
    for _ in range(100):
        if await _count(engine, conversation) == 2:
            break
        await asyncio.sleep(0.02)
    assert await _count(engine, conversation) == 2
    queue.put(conversation_messages, _row(tenant_id, conversation, 2))
    await asyncio.wait_for(queue.flush(), 5)  # flush does not wait out the linger
    assert await _count(engine, conversation) == 3
    await queue.close()
    await engine.dispose()


def _shout(row: dict[str, object]) -> dict[str, object]:
    """A picklable prepare: the message's content in capitals, and which process prepared it."""
    message = dict(row["message"])  # type: ignore[call-overload]
    message["content"] = str(message["content"]).upper()
    message["pid"] = os.getpid()
    return {**row, "message": message}


def _refuse(row: dict[str, object]) -> dict[str, object]:
    raise ValueError("no")


@pytest.mark.asyncio
@pytest.mark.parametrize("in_process", [True, False], ids=["process", "thread"])
async def test_prepare_runs_off_the_loop_and_a_failing_one_drops_its_row(
    database_url: str, keel: KeelServer, in_process: bool
) -> None:
    """Rows with much text are prepared in the executor's process, small ones in a thread here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    engine, tenant_id, conversation = await _setup(database_url)
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if in_process else None
    queue = WriteQueue(engine, batch_size=100, executor=pool)
    padding = "x" * SMALL_ROW_CHARS
    for i in range(6):
        prepare = _refuse if i == 4 else _shout if i % 2 else None
        row = _row(tenant_id, conversation, i)
        if i == 3:  # a large row
            row["message"] = {"role": "assistant", "content": f"reply {i} {padding}"}
        queue.put(conversation_messages, row, prepare=prepare)
    queue.start()
    await asyncio.wait_for(queue.flush(), 30)
    async with engine.connect() as conn:
        query = select(conversation_messages.c.message).where(
            conversation_messages.c.conversation_id == conversation
        )
        stored = {row.message["content"][:7]: row.message.get("pid") for row in await conn.execute(query)}
    assert sorted(stored) == ["REPLY 1", "REPLY 3", "REPLY 5", "reply 0", "reply 2"]  # 4: never written raw
    assert stored["REPLY 1"] == stored["REPLY 5"] == os.getpid()  # small: a thread of this process
    if in_process:
        assert stored["REPLY 3"] != os.getpid()
    else:
        assert stored["REPLY 3"] == os.getpid()
    assert queue.rejected == 1
    await queue.close()
    if pool is not None:
        pool.shutdown()
    await engine.dispose()
