"""Conversations as a product API: list, read, update, delete (audit content included), export; one
tenant's only, and hidden from requests that name another end user."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from keel.settings import TierLimits
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


def _sql(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.set_type_codec(
                "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
            )
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture
def api(keel: KeelServer) -> Iterator[Callable[[str], httpx.Client]]:
    """httpx on /v1 with a key; closed after the test."""
    made: list[httpx.Client] = []

    def make(key: str) -> httpx.Client:
        made.append(
            httpx.Client(base_url=keel.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        )
        return made[-1]

    yield make
    for client in made:
        client.close()


def _conversation(
    database_url: str,
    tenant_id: uuid.UUID,
    *,
    updated_at: datetime | None = None,
    end_user: str | None = None,
    metadata: dict[str, str] | None = None,
    messages: int = 0,
) -> str:
    """A stored conversation, as the chat path leaves one."""
    conversation = f"conv-{uuid.uuid4().hex[:10]}"
    _sql(
        database_url,
        "INSERT INTO conversations (tenant_id, id, updated_at, end_user, metadata) "
        "VALUES ($1, $2, coalesce($3, now()), $4, $5)",
        tenant_id,
        conversation,
        updated_at,
        end_user,
        metadata or {},
    )
    for n in range(messages):
        role = "user" if n % 2 == 0 else "assistant"
        _sql(
            database_url,
            "INSERT INTO conversation_messages (tenant_id, conversation_id, role, message, request_id) "
            "VALUES ($1, $2, $3, $4, $5)",
            tenant_id,
            conversation,
            role,
            {"role": role, "content": f"message {n}"},
            f"req_{n}",
        )
    return conversation


def _summary(database_url: str, tenant_id: uuid.UUID, conversation: str, version: int, text: str) -> None:
    _sql(
        database_url,
        "INSERT INTO conversation_summaries (tenant_id, conversation_id, text, covers_message_id, model, "
        "tokens, tokenizer, version, request_id) VALUES ($1, $2, $3, "
        "(SELECT max(id) FROM conversation_messages WHERE tenant_id = $1 AND conversation_id = $2), "
        "'local', 7, 'local', $4, 'req_summary')",
        tenant_id,
        conversation,
        text,
        version,
    )


def _chat_turns(
    client: openai.OpenAI, fake: FakeUpstream, conversation: str, *turns: tuple[str, str]
) -> None:
    for question, answer in turns:
        fake.enqueue(Reply(text=answer))
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": question}],
            temperature=0.5,
            max_tokens=50,
            extra_body={"conversation_id": conversation},
        )


def _wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_conversation_shows_its_messages_with_ids_and_tokens_and_its_newest_summary(
    client: openai.OpenAI,
    tenant: Any,
    fake: FakeUpstream,
    api: Callable[[str], httpx.Client],
    database_url: str,
) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:10]}"
    _chat_turns(client, fake, conversation, ("I am Ada.", "Hello Ada."), ("Name?", "Ada."))
    http = api(tenant.chat_key)
    _wait_for(lambda: len(http.get(f"/conversations/{conversation}").json()["messages"]) == 4)
    found = http.get(f"/conversations/{conversation}").json()
    assert found["summary"] is None
    _sql(
        database_url,
        "UPDATE conversation_messages SET tokens = 10 + length(message->>'content'), tokenizer = 'o200k' "
        "WHERE tenant_id = $1 AND conversation_id = $2",
        tenant.tenant_id,
        conversation,
    )
    _summary(database_url, tenant.tenant_id, conversation, 1, "Ada introduced herself.")
    _summary(database_url, tenant.tenant_id, conversation, 2, "Ada introduced herself and asked her name.")

    found = http.get(f"/conversations/{conversation}").json()
    assert (found["id"], found["object"], found["user"], found["title"], found["metadata"]) == (
        conversation,
        "conversation",
        None,
        None,
        {},
    )
    assert found["updated_at"] >= found["created_at"] > time.time() - 60
    items = found["items"]
    assert [(i["role"], i["message"]["content"], i["tokens"]) for i in items] == [
        ("user", "I am Ada.", 19),
        ("assistant", "Hello Ada.", 20),
        ("user", "Name?", 15),
        ("assistant", "Ada.", 14),
    ]
    ids = [i["id"] for i in items]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert all(i["tokenizer"] == "o200k" and i["created_at"] >= found["created_at"] for i in items)
    assert found["messages"] == [i["message"] for i in items]  # as before: plain OpenAI messages
    summary = found["summary"]
    assert (summary["version"], summary["text"], summary["covers_message_id"]) == (
        2,
        "Ada introduced herself and asked her name.",
        ids[-1],
    )
    # The official SDK reads it as OpenAI's conversation object.
    assert client.conversations.retrieve(conversation).id == conversation


def test_another_tenant_gets_404_on_every_route_and_changes_nothing(
    tenant: Any,
    make_tenant: Callable[..., Any],
    api: Callable[[str], httpx.Client],
    database_url: str,
) -> None:
    conversation = _conversation(database_url, tenant.tenant_id, messages=2, metadata={"k": "v"})
    intruder = make_tenant()
    for key in (intruder.chat_key, intruder.admin_key):
        http = api(key)
        answers = [
            http.get(f"/conversations/{conversation}"),
            http.get(f"/conversations/{conversation}/export"),
            http.patch(f"/conversations/{conversation}", json={"title": "mine now"}),
            http.delete(f"/conversations/{conversation}"),
        ]
        for answer in answers:
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["type"] == "not_found_error"
        assert [c["id"] for c in http.get("/conversations").json()["data"]] == []
        missing = http.get("/conversations/conv-none-such").json()
        assert (
            missing["error"]["message"].replace("conv-none-such", conversation)
            == answers[0].json()["error"]["message"]
        )  # indistinguishable from a missing one
    kept = api(tenant.chat_key).get(f"/conversations/{conversation}").json()
    assert (kept["title"], len(kept["messages"])) == (None, 2)


def test_pages_go_newest_first_without_duplicates_or_gaps(
    tenant: Any, make_tenant: Callable[..., Any], api: Callable[[str], httpx.Client], database_url: str
) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    # 45 conversations, in groups of three with the same update time: the id breaks ties.
    made = [
        _conversation(database_url, tenant.tenant_id, updated_at=start + timedelta(minutes=n // 3))
        for n in range(45)
    ]
    _conversation(database_url, make_tenant().tenant_id, updated_at=start)  # another tenant's: never listed
    expected = [c for _, c in sorted(((n // 3, c) for n, c in enumerate(made)), reverse=True)]
    http = api(tenant.chat_key)
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 20} | ({"after": cursor} if cursor else {})
        page = http.get("/conversations", params=params).json()
        pages.append(page)
        cursor = page["next_cursor"]
        assert page["has_more"] is (cursor is not None)
        if cursor is None:
            break
    assert [len(p["data"]) for p in pages] == [20, 20, 5]
    seen = [c["id"] for p in pages for c in p["data"]]
    assert seen == expected
    assert all(p["object"] == "list" for p in pages)
    assert [(p["first_id"], p["last_id"]) for p in pages] == [
        (p["data"][0]["id"], p["data"][-1]["id"]) for p in pages
    ]
    assert http.get("/conversations").json()["data"][0]["id"] == expected[0]  # default limit 20
    assert len(http.get("/conversations").json()["data"]) == 20

    for bad in ({"limit": 0}, {"limit": 101}, {"after": "not-a-cursor"}):
        refused = http.get("/conversations", params=bad)
        assert refused.status_code == 400, bad
        assert refused.json()["error"]["type"] == "invalid_request_error"


def test_lists_filter_by_user_metadata_and_update_time(
    tenant: Any, api: Callable[[str], httpx.Client], database_url: str
) -> None:
    old = datetime(2024, 6, 1, tzinfo=UTC)
    ada_old = _conversation(
        database_url, tenant.tenant_id, updated_at=old, end_user="ada", metadata={"topic": "x"}
    )
    ada_new = _conversation(
        database_url, tenant.tenant_id, end_user="ada", metadata={"topic": "billing", "tier": "gold"}
    )
    bob = _conversation(database_url, tenant.tenant_id, end_user="bob", metadata={"topic": "billing"})
    anyone = _conversation(database_url, tenant.tenant_id, updated_at=old)
    http = api(tenant.chat_key)

    def ids(**params: Any) -> set[str]:
        answer = http.get("/conversations", params=params)
        assert answer.status_code == 200, answer.text
        return {c["id"] for c in answer.json()["data"]}

    assert ids() == {ada_old, ada_new, bob, anyone}
    assert ids(user="ada") == {ada_old, ada_new}
    assert ids(**{"metadata[topic]": "billing"}) == {ada_new, bob}
    assert ids(**{"metadata[topic]": "billing", "metadata[tier]": "gold"}) == {ada_new}
    assert ids(metadata='{"topic": "billing"}', user="bob") == {bob}
    since = old + timedelta(days=1)
    assert ids(updated_since=since.isoformat()) == {ada_new, bob}
    assert ids(updated_since=str(int(since.timestamp()))) == {ada_new, bob}
    assert ids(updated_since="2024-06-01T00:00:00Z") == {ada_old, ada_new, bob, anyone}

    for name, value in (("updated_since", "yesterday"), ("metadata", "[1]"), ("metadata", "{")):
        refused = http.get("/conversations", params={name: value})
        assert refused.status_code == 400
        assert refused.json()["error"] == {
            "message": refused.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": name,
            "code": None,
        }


def test_title_and_metadata_are_updated_within_openais_caps(
    client: openai.OpenAI, tenant: Any, api: Callable[[str], httpx.Client], database_url: str
) -> None:
    conversation = _conversation(database_url, tenant.tenant_id, updated_at=datetime(2024, 1, 1, tzinfo=UTC))
    http = api(tenant.chat_key)
    patched = http.patch(
        f"/conversations/{conversation}", json={"title": "Trip to Lisbon", "metadata": {"a": "1"}}
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["title"], patched.json()["metadata"]) == ("Trip to Lisbon", {"a": "1"})
    assert patched.json()["updated_at"] > time.time() - 60  # an update is an update: it lists first again

    # The official SDK updates metadata with POST; the whole object is replaced, the title kept.
    sixteen = {f"k{n}": "v" * 512 for n in range(15)} | {"k" * 64: "v"}
    updated = client.conversations.update(conversation, metadata=sixteen)
    assert updated.metadata == sixteen
    stored = http.get(f"/conversations/{conversation}").json()
    assert (stored["title"], stored["metadata"]) == ("Trip to Lisbon", sixteen)

    over = {
        "17 keys": {"metadata": {f"k{n}": "v" for n in range(17)}},
        "long key": {"metadata": {"k" * 65: "v"}},
        "long value": {"metadata": {"k": "v" * 513}},
        "not a string": {"metadata": {"k": 1}},
        "not an object": {"metadata": ["k"]},
        "long title": {"title": "t" * 513},
        "title a number": {"title": 5},
    }
    for case, body in over.items():
        refused = http.patch(f"/conversations/{conversation}", json=body)
        assert refused.status_code == 400, case
        error = refused.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", next(iter(body))), case
    unknown = http.patch(f"/conversations/{conversation}", json={"colour": "red"})
    assert unknown.status_code == 400
    assert http.patch(f"/conversations/{conversation}", json={}).status_code == 400
    cleared = http.patch(f"/conversations/{conversation}", json={"title": None, "metadata": None}).json()
    assert (cleared["title"], cleared["metadata"]) == (None, {})


def test_a_conversation_bound_to_an_end_user_is_hidden_from_requests_naming_another(
    tenant: Any, api: Callable[[str], httpx.Client], database_url: str
) -> None:
    conversation = _conversation(database_url, tenant.tenant_id, end_user="ada", messages=2)
    chat, admin = api(tenant.chat_key), api(tenant.admin_key)
    path = f"/conversations/{conversation}"
    as_bob = {"user": "bob"}
    assert chat.get(path, params=as_bob).status_code == 404
    assert chat.get(f"{path}/export", params=as_bob).status_code == 404
    assert chat.patch(path, params=as_bob, json={"title": "bob's"}).status_code == 404
    assert chat.delete(path, params=as_bob).status_code == 404
    assert chat.get(path, params={"user": "ada"}).json()["user"] == "ada"
    assert chat.get(path).status_code == 200  # a request that names no end user
    assert admin.get(path, params=as_bob).status_code == 200  # admin keys see the whole tenant
    assert [c["id"] for c in chat.get("/conversations", params=as_bob).json()["data"]] == []

    rebind = chat.patch(path, json={"user": "bob"})
    assert rebind.status_code == 403
    assert rebind.json()["error"]["param"] == "user"
    assert admin.patch(path, json={"user": "bob"}).json()["user"] == "bob"
    assert chat.get(path, params={"user": "ada"}).status_code == 404
    unbound = _conversation(database_url, tenant.tenant_id)
    assert chat.patch(f"/conversations/{unbound}", json={"user": "cy"}).json()["user"] == "cy"  # bound once


def test_delete_removes_messages_and_summaries_and_erases_audit_content(
    client: openai.OpenAI,
    tenant: Any,
    fake: FakeUpstream,
    api: Callable[[str], httpx.Client],
    database_url: str,
) -> None:
    conversation, other = f"conv-{uuid.uuid4().hex[:10]}", f"conv-{uuid.uuid4().hex[:10]}"
    _chat_turns(client, fake, conversation, ("my secret is 42", "noted: 42"), ("and 43", "noted: 43"))
    _chat_turns(client, fake, other, ("keep me", "kept"))
    audit_query = "SELECT * FROM audit_requests WHERE tenant_id = $1 AND conversation_id = $2 ORDER BY id"

    def audit(of: str) -> list[asyncpg.Record]:
        return _sql(database_url, audit_query, tenant.tenant_id, of)

    _wait_for(lambda: len(audit(conversation)) == 2 and len(audit(other)) == 1)
    # The context decision and retrieved chunks, as the context and RAG layers record them.
    context = {
        "message_ids": [1, 2],
        "summary_id": 7,
        "tokens": {"total": 120, "summary": 30},
        "dropped_turns": 1,
        "strategy": "summarize",
        "summary_text": "the secret is 42",
        "sent": [{"id": 1, "content": "my secret is 42"}],
    }
    for of in (conversation, other):
        _sql(
            database_url,
            "UPDATE audit_requests SET context = $3, retrieved = $4 "
            "WHERE tenant_id = $1 AND conversation_id = $2",
            tenant.tenant_id,
            of,
            context,
            [{"id": "chunk_1", "score": 0.9, "source": "secret.pdf"}],
        )
    _summary(database_url, tenant.tenant_id, conversation, 1, "The user's secret is 42.")
    before = audit(conversation)
    assert "my secret is 42" in orjson.dumps(before[0]["request"]).decode()
    assert before[0]["reply"]["text"] == "noted: 42"

    deleted = client.conversations.delete(conversation)
    assert (deleted.id, deleted.object, deleted.deleted) == (conversation, "conversation.deleted", True)

    def count(table: str) -> int:
        rows = _sql(
            database_url,
            f"SELECT count(*) AS n FROM {table} WHERE tenant_id = $1 AND conversation_id = $2",
            tenant.tenant_id,
            conversation,
        )
        return int(rows[0]["n"])

    assert (count("conversation_messages"), count("conversation_summaries")) == (0, 0)
    http = api(tenant.chat_key)
    assert http.get(f"/conversations/{conversation}").status_code == 404
    assert http.delete(f"/conversations/{conversation}").status_code == 404

    after = audit(conversation)
    assert len(after) == 2  # the records stay: usage, cost and timings are still accounted for
    for old, new in zip(before, after, strict=True):
        assert "secret" not in orjson.dumps(dict(new), default=str).decode()
        assert "42" not in orjson.dumps(new["request"]).decode() + orjson.dumps(new["context"]).decode()
        assert new["request"] == {"model": "fake", "messages": None, "max_tokens": 50, "temperature": 0.5}
        assert (new["reply"], new["retrieved"]) == (None, [])
        assert new["context"] == {
            "message_ids": [1, 2],
            "summary_id": 7,
            "tokens": {"total": 120, "summary": 30},
            "dropped_turns": 1,
            "strategy": "summarize",
        }
        for kept in (
            "request_id",
            "status",
            "model_requested",
            "model_answered",
            "input_tokens",
            "output_tokens",
            "latency_ms",
            "created_at",
            "finish_reason",
            "attempts",
            "end_user",
            "prompt",
        ):
            assert new[kept] == old[kept], kept
    untouched = audit(other)[0]  # another conversation of the same tenant keeps its content
    assert untouched["reply"]["text"] == "kept"
    assert untouched["context"] == context


def test_export_holds_the_conversation_every_message_and_every_summary(
    tenant: Any, api: Callable[[str], httpx.Client], database_url: str
) -> None:
    conversation = _conversation(
        database_url, tenant.tenant_id, end_user="ada", metadata={"k": "v"}, messages=3
    )
    _summary(database_url, tenant.tenant_id, conversation, 1, "first")
    _summary(database_url, tenant.tenant_id, conversation, 2, "second")
    exported = api(tenant.chat_key).get(f"/conversations/{conversation}/export")
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/json"
    body = exported.json()
    assert body["object"] == "conversation.export"
    assert (body["conversation"]["id"], body["conversation"]["user"], body["conversation"]["metadata"]) == (
        conversation,
        "ada",
        {"k": "v"},
    )
    assert [m["message"]["content"] for m in body["messages"]] == ["message 0", "message 1", "message 2"]
    assert [(s["version"], s["text"]) for s in body["summaries"]] == [(2, "second"), (1, "first")]


def test_every_conversation_route_spends_the_tenants_requests_per_minute(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any], database_url: str
) -> None:
    limits = TierLimits(requests_per_minute=3, tokens_per_minute=1_000_000, concurrent_requests=100)
    server = start_keel(tiers={"free": limits})
    tenant, other = make_tenant("free"), make_tenant("free")
    conversation = _conversation(database_url, tenant.tenant_id)
    headers = {"Authorization": f"Bearer {tenant.chat_key}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        assert http.get("/conversations").status_code == 200
        assert http.patch(f"/conversations/{conversation}", json={"title": "t"}).status_code == 200
        assert http.get(f"/conversations/{conversation}/export").status_code == 200
        refused = http.delete(f"/conversations/{conversation}")
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert http.get(f"/conversations/{conversation}").status_code == 429
    other_headers = {"Authorization": f"Bearer {other.chat_key}"}
    assert (
        httpx.get(f"{server.base_url}/conversations", headers=other_headers).status_code == 200
    )  # per tenant
