"""A graceful shutdown (SIGTERM) with conversation writes in flight loses none of them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

from keel.db.engine import create_engine
from keel.testing import FakeUpstream, Reply


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
    database_url: str, fake: FakeUpstream, tmp_path: Path, tenant: Any
) -> None:
    port = _free_port()
    config = tmp_path / "keel.toml"
    config.write_text(
        f'default_model = "fake"\n[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n'
    )
    env = {
        **os.environ,
        "KEEL_DATABASE_URL": database_url,
        "KEEL_DATA_DIR": str(tmp_path),
        "KEEL_PORT": str(port),
        "KEEL_CONFIG": str(config),
        "KEEL_LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "keel", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "keel serve did not start"
            time.sleep(0.1)

        count = 16
        fake.enqueue(*[Reply(text=f"reply {i}", delay=1.0) for i in range(count)])
        conversations = [f"shutdown-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=tenant.chat_key, max_retries=0)
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
        server.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        client.close()
        locker.join()
        # uvicorn re-raises the signal once its graceful shutdown is done
        assert server.wait(30) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    assert len(answers) == count  # every acknowledged request was answered ...
    assert _stored_replies(database_url, conversations) == count  # ... and its reply is stored
