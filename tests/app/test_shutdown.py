"""A graceful shutdown (SIGTERM) with conversation writes in flight loses none of them."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from keel.db.engine import create_engine
from keel.testing import FakeUpstream, KeelProcess, Reply


def _stored_replies(database_url: str, conversation_ids: list[str]) -> int:
    from sqlalchemy import text

    async def go() -> int:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    text(
                        "SELECT count(*) FROM conversation_messages "
                        "WHERE role = 'assistant' AND conversation_id = ANY(:ids)"
                    ),
                    {"ids": conversation_ids},
                )
                return int(result.scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _lock_table_for(database_url: str, seconds: float, locked: threading.Event) -> None:
    """Hold an exclusive lock on the messages table: replies must wait in Keel's write queue meanwhile."""
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE conversation_messages IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.sleep(seconds)
        finally:
            await conn.close()

    asyncio.run(go())


def test_sigterm_drains_in_flight_requests_and_writes(
    database_url: str,
    fake: FakeUpstream,
    tmp_path: Path,
    tenant: Any,
    make_client: Callable[..., openai.OpenAI],
) -> None:
    config = tmp_path / "keel.toml"
    config.write_text(
        f'default_model = "fake"\n[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n'
    )
    env = {"KEEL_DATABASE_URL": database_url, "KEEL_CONFIG": str(config), "KEEL_LOG_LEVEL": "WARNING"}
    with KeelProcess(tmp_path, env) as server:
        count = 16
        fake.enqueue(*[Reply(text=f"reply {i}", delay=1.0) for i in range(count)])
        conversations = [f"shutdown-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        client = make_client(server, tenant.chat_key)
        answers: list[str | None] = []

        def ask(conversation: str) -> None:
            completion = client.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"conversation_id": conversation},
            )
            answers.append(completion.choices[0].message.content)

        threads = [threading.Thread(target=ask, args=(c,)) for c in conversations]
        for thread in threads:
            thread.start()
        while len(fake.requests) < count:  # every request is at the model: in flight
            time.sleep(0.01)
        locked = threading.Event()
        locker = threading.Thread(target=_lock_table_for, args=(database_url, 2.0, locked))
        locker.start()
        assert locked.wait(10)
        status = server.terminate()
        for thread in threads:
            thread.join(30)
        client.close()
        locker.join()
        # uvicorn re-raises the signal once its graceful shutdown is done
        assert status in (0, -signal.SIGTERM)
    assert len(answers) == count  # every acknowledged request was answered ...
    assert _stored_replies(database_url, conversations) == count  # ... and its reply is stored
