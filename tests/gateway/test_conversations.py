"""Conversations: prior turns go upstream, new turns are stored, tenants never see each other's."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


def _get(keel: KeelServer, key: str, conversation_id: str) -> httpx.Response:
    return httpx.get(
        f"{keel.base_url}/conversations/{conversation_id}", headers={"Authorization": f"Bearer {key}"}
    )


def _wait_for_turns(keel: KeelServer, key: str, conversation_id: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        messages: list[dict[str, Any]] = _get(keel, key, conversation_id).json().get("messages", [])
        if len(messages) >= count or time.monotonic() > deadline:
            return messages
        time.sleep(0.02)


def test_turns_are_stored_and_sent_back_upstream(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    fake.enqueue(Reply(text="Nice to meet you, Ada."), Reply(text="Your name is Ada."))
    raw = client.chat.completions.with_raw_response.create(
        model="fake",
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I am Ada."}],
        extra_body={"conversation_id": conversation},
    )
    assert raw.headers["x-keel-conversation-id"] == conversation
    _wait_for_turns(keel, tenant.chat_key, conversation, 2)

    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "What is my name?"}],
        extra_headers={"X-Keel-Conversation-Id": conversation},
    )
    sent = fake.requests[-1].body["messages"]
    assert sent == [
        {"role": "user", "content": "I am Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    turns = _wait_for_turns(keel, tenant.chat_key, conversation, 4)
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "I am Ada."),
        ("assistant", "Nice to meet you, Ada."),
        ("user", "What is my name?"),
        ("assistant", "Your name is Ada."),
    ]


def test_streamed_reply_is_stored(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    fake.enqueue(Reply(text="streamed words here", chunks=["streamed", " words", " here"]))
    list(
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "go"}],
            stream=True,
            extra_body={"conversation_id": conversation},
        )
    )
    turns = _wait_for_turns(keel, tenant.chat_key, conversation, 2)
    assert turns[-1] == {"role": "assistant", "content": "streamed words here"}


def test_user_turn_is_durable_even_when_the_model_fails(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    fake.default_reply = Reply(status=500)  # every attempt, retries included
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "remember me"}],
            extra_body={"conversation_id": conversation},
        )
    assert caught.value.status_code == 502
    turns = _get(keel, tenant.chat_key, conversation).json()["messages"]
    assert turns == [{"role": "user", "content": "remember me"}]


def test_other_tenants_cannot_see_or_extend_a_conversation(
    client: openai.OpenAI,
    keel: KeelServer,
    tenant: Any,
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    fake: FakeUpstream,
) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "secret of tenant A"}],
        extra_body={"conversation_id": conversation},
    )
    intruder = make_tenant()
    response = _get(keel, intruder.chat_key, conversation)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    # The same id under another tenant is another conversation: A's turns never reach B's model call.
    make_client(keel, intruder.chat_key).chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hello"}],
        extra_body={"conversation_id": conversation},
    )
    assert fake.requests[-1].body["messages"] == [{"role": "user", "content": "hello"}]
    assert _wait_for_turns(keel, tenant.chat_key, conversation, 2)[0]["content"] == "secret of tenant A"


def test_next_turn_sees_the_previous_reply_even_while_its_write_waits(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream, database_url: str
) -> None:
    """A fast client's next turn must not miss the answer it just got, though replies are written later."""
    import asyncio
    import threading

    import asyncpg

    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    fake.enqueue(Reply(text="First answer.", delay=0.5), Reply(text="Second answer."))
    locked, release = threading.Event(), threading.Event()

    def hold_share_lock() -> None:
        async def go() -> None:
            conn = await asyncpg.connect(database_url)
            try:
                async with conn.transaction():
                    # SHARE blocks INSERTs (the queued reply) but not SELECTs (loading the history).
                    await conn.execute("LOCK TABLE conversation_messages IN SHARE MODE")
                    locked.set()
                    await asyncio.to_thread(release.wait, 10)
            finally:
                await conn.close()

        asyncio.run(go())

    def release_soon() -> None:
        time.sleep(1.0)
        release.set()

    first = threading.Thread(
        target=lambda: client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "one"}],
            extra_body={"conversation_id": conversation},
        )
    )
    first.start()
    while not fake.requests or fake.requests[-1].body["messages"][-1]["content"] != "one":
        time.sleep(0.01)
    locker = threading.Thread(target=hold_share_lock)
    locker.start()
    assert locked.wait(10)
    first.join(30)  # answered; its reply is queued behind the lock
    threading.Thread(target=release_soon).start()
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "two"}],
        extra_body={"conversation_id": conversation},
    )
    locker.join(30)
    assert [m["content"] for m in fake.requests[-1].body["messages"]] == ["one", "First answer.", "two"]


def test_a_nul_character_in_a_stored_turn_is_a_400_not_a_500(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    """PostgreSQL cannot hold U+0000 in text: the client hears why, and the model is never called."""
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    calls = len(fake.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "a\u0000b"}],
            extra_body={"conversation_id": conversation},
        )
    assert caught.value.code == "unstorable_value"
    assert "NUL" in caught.value.message
    assert caught.value.response.headers["x-request-id"]
    assert len(fake.requests) == calls
    # Without a conversation nothing is stored but the audit record: the answer comes back as usual.
    fake.enqueue(Reply(text="fine"))
    answer = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "a\u0000b"}])
    assert answer.choices[0].message.content == "fine"
    assert _get(keel, tenant.chat_key, conversation).status_code == 404
