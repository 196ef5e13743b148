"""Conversation turns through a real Keel: trimmed to the window, summarized, bound to a user, durable."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from keel.db.engine import create_engine
from keel.settings import ContextSettings, ModelConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.fake_upstream import RecordedRequest
from keel.testing.server import KeelServer

WINDOW = 400
ANSWER = 40


def _small(fake: FakeUpstream) -> dict[str, ModelConfig]:
    return {
        "fake": ModelConfig(provider="openai", base_url=fake.openai_base_url, model="fake-gpt"),
        "small": ModelConfig(
            provider="openai",
            base_url=fake.openai_base_url,
            model="fake-small",
            context_window=WINDOW,
            max_output_tokens=ANSWER,
        ),
    }


def _turn(keel: KeelServer, key: str, conversation: str, text: str, **extra: Any) -> httpx.Response:
    body = {
        "model": "small",
        "messages": [{"role": "user", "content": text}],
        "conversation_id": conversation,
    }
    return httpx.post(
        f"{keel.base_url}/chat/completions",
        json=body | extra,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def _chat_requests(fake: FakeUpstream) -> list[RecordedRequest]:
    """The turns' upstream requests (a summary job's are left out: they may come in between)."""
    return [
        r
        for r in fake.requests
        if r.path.endswith("/chat/completions") and "New turns:" not in str(r.body["messages"][-1]["content"])
    ]


@pytest.fixture
def small_keel(start_keel: Callable[..., KeelServer], fake: FakeUpstream) -> KeelServer:
    return start_keel(models=_small(fake), context=ContextSettings(strategy="trim"))


def test_a_long_conversation_is_trimmed_to_whole_turns_and_says_so(
    small_keel: KeelServer, make_tenant: Callable[..., Any], fake: FakeUpstream
) -> None:
    tenant = make_tenant()
    conversation = f"long-{uuid.uuid4().hex[:8]}"
    fake.default_reply = Reply(text="Noted, thank you for telling me that.")
    dropped = []
    for turn in range(30):
        response = _turn(small_keel, tenant.chat_key, conversation, f"Fact number {turn}: " + "tea " * 12)
        assert response.status_code == 200, response.text
        tokens = int(response.headers["x-keel-context-tokens"])
        assert tokens <= WINDOW - ANSWER
        dropped.append(int(response.headers["x-keel-context-dropped"]))
        assert response.headers["x-keel-context-summary"] == "none"
        sent = _chat_requests(fake)[-1].body["messages"]
        assert sent[0]["role"] == "user"  # whole turn groups: never a reply without its question
        assert sent[-1]["content"].startswith(f"Fact number {turn}:")
    assert dropped[0] == 0
    assert dropped[-1] > 20  # most of the 30 turns no longer fit; the request still works
    assert dropped == sorted(dropped)


def test_a_turn_that_cannot_fit_is_context_length_exceeded(
    small_keel: KeelServer, make_tenant: Callable[..., Any]
) -> None:
    tenant = make_tenant()
    client = openai.OpenAI(base_url=small_keel.base_url, api_key=tenant.chat_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": "word " * 2000}],
            extra_body={"conversation_id": f"big-{uuid.uuid4().hex[:8]}"},
        )
    assert caught.value.code == "context_length_exceeded"
    assert "tokens too many" in caught.value.message


def test_a_conversation_belongs_to_the_user_of_its_first_turn(
    small_keel: KeelServer, make_tenant: Callable[..., Any]
) -> None:
    tenant = make_tenant()
    conversation = f"owned-{uuid.uuid4().hex[:8]}"
    assert _turn(small_keel, tenant.chat_key, conversation, "hi", user="ada").status_code == 200
    assert _turn(small_keel, tenant.chat_key, conversation, "again", user="ada").status_code == 200
    stranger = _turn(small_keel, tenant.chat_key, conversation, "let me in", user="mallory")
    assert stranger.status_code == 404
    assert stranger.json()["error"]["param"] == "conversation_id"
    assert _turn(small_keel, tenant.chat_key, conversation, "no user").status_code == 404


def test_dropped_turns_are_folded_into_a_summary_that_later_turns_use(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any], fake: FakeUpstream
) -> None:
    keel = start_keel(
        models=_small(fake),
        context=ContextSettings(strategy="summarize", summary_model="small", summary_max_tokens=30),
    )
    tenant = make_tenant()
    conversation = f"sum-{uuid.uuid4().hex[:8]}"

    def respond(request: RecordedRequest) -> Reply | None:
        messages = request.body["messages"]
        if "New turns:" in str(messages[-1]["content"]):
            return Reply(text="SUMMARY: the user listed facts about tea.")
        return Reply(text="Noted.")

    fake.responder = respond
    summary_header = "none"
    deadline = time.monotonic() + 30
    turn = 0
    while summary_header == "none":
        assert time.monotonic() < deadline, "no summary was used within 30 s"
        response = _turn(keel, tenant.chat_key, conversation, f"Fact {turn}: " + "tea " * 15)
        assert response.status_code == 200, response.text
        summary_header = response.headers["x-keel-context-summary"]
        turn += 1
        time.sleep(0.05)
    sent = _chat_requests(fake)[-1].body["messages"]
    assert sent[0] == {
        "role": "system",
        "content": "Summary of the earlier conversation:\nSUMMARY: the user listed facts about tea.",
    }
    # The summary call is audited like any call, tagged as a summary of this conversation.
    audit = httpx.get(
        f"{keel.base_url}/requests",
        params={"conversation_id": conversation, "limit": 100},
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
    ).json()["data"]
    assert any((r.get("context") or {}).get("kind") == "summary" for r in audit), audit[:2]


def test_the_next_turn_on_another_replica_sees_the_reply(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any], fake: FakeUpstream
) -> None:
    """The reply is committed before the answer's last byte, so a replica that did not write it sees it."""
    first = start_keel(models=_small(fake), write_linger_seconds=2.0)
    second = start_keel(models=_small(fake))
    tenant = make_tenant()
    for stream in (False, True):
        conversation = f"replicas-{uuid.uuid4().hex[:8]}"
        fake.enqueue(Reply(text="The answer is 42."), Reply(text="Yes."))
        client = openai.OpenAI(base_url=first.base_url, api_key=tenant.chat_key, max_retries=0)
        answer = client.chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": "What is the answer?"}],
            extra_body={"conversation_id": conversation},
            stream=stream,
        )
        if stream:
            assert (
                "".join(c.choices[0].delta.content or "" for c in answer if c.choices) == "The answer is 42."
            )
        response = _turn(second, tenant.chat_key, conversation, "Sure?")
        assert response.status_code == 200
        sent = _chat_requests(fake)[-1].body["messages"]
        assert [m["content"] for m in sent] == ["What is the answer?", "The answer is 42.", "Sure?"]


def test_a_stored_reply_carries_its_token_count(
    small_keel: KeelServer, make_tenant: Callable[..., Any], database_url: str, fake: FakeUpstream
) -> None:
    tenant = make_tenant()
    conversation = f"counted-{uuid.uuid4().hex[:8]}"
    fake.enqueue(Reply(text="A reply of a few words."))
    assert _turn(small_keel, tenant.chat_key, conversation, "Count me.").status_code == 200

    async def rows() -> list[Any]:
        from sqlalchemy import text

        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    text(
                        "SELECT role, tokens, tokenizer FROM conversation_messages "
                        "WHERE conversation_id = :c ORDER BY id"
                    ),
                    {"c": conversation},
                )
                return list(result)
        finally:
            await engine.dispose()

    stored = asyncio.run(rows())
    assert [r.role for r in stored] == ["user", "assistant"]
    assert all(r.tokens and r.tokens > 3 for r in stored)
    assert {r.tokenizer for r in stored} == {"estimate:o200k_base"}


def test_a_prompt_version_may_lower_the_window(
    small_keel: KeelServer, make_tenant: Callable[..., Any], fake: FakeUpstream
) -> None:
    tenant = make_tenant()
    name = f"narrow-{uuid.uuid4().hex[:8]}"
    pushed = httpx.post(
        f"{small_keel.base_url}/prompts",
        json={
            "name": name,
            "template": "Be brief.",
            "model": {"context_window": 300},
            "labels": ["production"],
        },
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
        timeout=30,
    )
    assert pushed.status_code in (200, 201), pushed.text
    fake.default_reply = Reply(text="Noted.")
    narrow, wide = f"narrow-{uuid.uuid4().hex[:8]}", f"wide-{uuid.uuid4().hex[:8]}"
    budget = 300 - ANSWER - ContextSettings().margin_tokens  # the prompt's window, not the alias's 400
    for turn in range(12):
        text = f"Fact number {turn}: " + "tea " * 12
        lowered = _turn(small_keel, tenant.chat_key, narrow, text, prompt={"name": name})
        assert lowered.status_code == 200, lowered.text
        assert int(lowered.headers["x-keel-context-tokens"]) <= budget
        plain = _turn(small_keel, tenant.chat_key, wide, text)
        assert plain.status_code == 200, plain.text
    assert int(lowered.headers["x-keel-context-dropped"]) > int(plain.headers["x-keel-context-dropped"])
    assert int(plain.headers["x-keel-context-tokens"]) > budget  # the alias's own window holds more
