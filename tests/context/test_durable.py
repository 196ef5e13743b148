"""SIGKILL under load: every conversation turn whose answer arrived has its reply stored."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.db.engine import create_engine
from keel.testing import FakeUpstream, KeelProcess, Reply
from keel.testing.fake_upstream import RecordedRequest


def _stored_replies(database_url: str, conversations: list[str]) -> set[tuple[str, str]]:
    from sqlalchemy import text

    async def go() -> set[tuple[str, str]]:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    text(
                        "SELECT conversation_id, message->>'content' FROM conversation_messages "
                        "WHERE role = 'assistant' AND conversation_id = ANY(:ids)"
                    ),
                    {"ids": conversations},
                )
                return {(row[0], row[1]) for row in result}
        finally:
            await engine.dispose()

    return asyncio.run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_sigkill_under_load_loses_no_acknowledged_reply(
    database_url: str, fake: FakeUpstream, tmp_path: Path, tenant: Any, stream: bool
) -> None:
    config = tmp_path / "keel.toml"
    config.write_text(
        f'default_model = "fake"\n[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n'
    )
    env = {
        "KEEL_DATABASE_URL": database_url,
        "KEEL_CONFIG": str(config),
        "KEEL_LOG_LEVEL": "WARNING",
        "KEEL_WRITE_LINGER_SECONDS": "1.0",  # queued writes would wait: a kill finds them in memory
    }

    def respond(request: RecordedRequest) -> Reply:
        last = request.body["messages"][-1]["content"]
        return Reply(text=f"reply to {last}", delay=0.01)

    fake.responder = respond
    acknowledged: set[tuple[str, str]] = set()
    conversations = [f"kill-{uuid.uuid4().hex[:8]}" for _ in range(16)]
    stop = threading.Event()
    with KeelProcess(tmp_path, env) as server:

        def talk(conversation: str) -> None:
            headers = {"Authorization": f"Bearer {tenant.chat_key}"}
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as client:
                turn = 0
                while not stop.is_set():
                    message = f"{conversation} turn {turn}"
                    body = {
                        "model": "fake",
                        "messages": [{"role": "user", "content": message}],
                        "conversation_id": conversation,
                        "stream": stream,
                    }
                    try:
                        response = client.post("/chat/completions", json=body)
                    except httpx.HTTPError:
                        return  # the server died
                    if response.status_code != 200 or (stream and "data: [DONE]" not in response.text):
                        return
                    acknowledged.add((conversation, f"reply to {message}"))
                    turn += 1

        threads = [threading.Thread(target=talk, args=(c,)) for c in conversations]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        server.stop()  # SIGKILL: no drain, no shutdown hook
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert len(acknowledged) > 50  # the load was real
    missing = acknowledged - _stored_replies(database_url, conversations)
    assert not missing, f"{len(missing)} acknowledged replies were lost: {sorted(missing)[:5]}"
