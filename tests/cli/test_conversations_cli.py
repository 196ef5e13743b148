"""`keel conversations list|show|delete|export`: one tenant's conversations from the command line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import openai

from keel.testing import FakeUpstream, Reply

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _sql(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def _audit(database_url: str, tenant_id: uuid.UUID, conversation: str) -> list[asyncpg.Record]:
    return _sql(
        database_url,
        "SELECT request::text, reply::text, input_tokens FROM audit_requests "
        "WHERE tenant_id = $1 AND conversation_id = $2",
        tenant_id,
        conversation,
    )


def _talk(client: openai.OpenAI, fake: FakeUpstream, conversation: str, question: str, answer: str) -> None:
    fake.enqueue(Reply(text=answer))
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": question}],
        extra_body={"conversation_id": conversation},
    )


def test_list_show_export_and_delete(
    keel_cli: Cli,
    client: openai.OpenAI,
    fake: FakeUpstream,
    tenant: Any,
    make_tenant: Callable[..., Any],
    database_url: str,
    tmp_path: Path,
) -> None:
    first, second = f"cli-{uuid.uuid4().hex[:8]}", f"cli-{uuid.uuid4().hex[:8]}"
    _talk(client, fake, first, "my passport number is X123", "noted")
    _talk(client, fake, second, "hello", "hi")
    _sql(
        database_url,
        "UPDATE conversations SET end_user = 'ada', title = 'Passport', "
        "metadata = '{\"topic\": \"travel\"}', updated_at = now() - interval '1 hour' "
        "WHERE tenant_id = $1 AND id = $2",
        tenant.tenant_id,
        first,
    )
    deadline = time.monotonic() + 10
    while (
        len(_audit(database_url, tenant.tenant_id, first)) < 1
        or len(_sql(database_url, "SELECT 1 FROM conversation_messages WHERE conversation_id = $1", first))
        < 2
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    scope = ("--tenant", tenant.name)

    listed = json.loads(keel_cli("conversations", "list", *scope, "--format", "json").stdout)
    assert [c["id"] for c in listed["data"]] == [second, first]  # newest update first
    table = keel_cli("conversations", "list", *scope, "--user", "ada", "--metadata", "topic=travel").stdout
    [row] = [line.split("\t") for line in table.splitlines()[1:]]
    assert (row[0], row[2], row[3], row[4]) == (first, "ada", "Passport", '{"topic":"travel"}')
    page = keel_cli("conversations", "list", *scope, "--limit", "1").stdout.splitlines()
    assert page[1].startswith(second) and page[-1].startswith("more: --after ")
    rest = keel_cli(
        "conversations", "list", *scope, "--after", page[-1].split()[-1], "--format", "json"
    ).stdout
    assert [c["id"] for c in json.loads(rest)["data"]] == [first]

    shown = keel_cli("conversations", "show", first, *scope).stdout
    assert "Passport" in shown and "user (" in shown and "my passport number is X123" in shown
    items = json.loads(keel_cli("conversations", "show", first, *scope, "--format", "json").stdout)["items"]
    assert [i["message"]["content"] for i in items] == ["my passport number is X123", "noted"]
    exported = tmp_path / "export.json"
    keel_cli("conversations", "export", first, *scope, "--output", str(exported))
    body = json.loads(exported.read_text())
    assert (body["conversation"]["id"], len(body["messages"]), body["summaries"]) == (first, 2, [])

    other = make_tenant()
    hidden = keel_cli("conversations", "show", first, "--tenant", other.name, check=False)
    assert hidden.returncode == 1 and "no conversation" in hidden.stderr
    refused = keel_cli("conversations", "delete", first, "--tenant", other.name, "--yes", check=False)
    assert refused.returncode == 1

    assert "deleted" in keel_cli("conversations", "delete", first, *scope, "--yes").stdout
    gone = keel_cli("conversations", "show", first, *scope, check=False)
    assert gone.returncode == 1 and "no conversation" in gone.stderr
    [record] = _audit(database_url, tenant.tenant_id, first)  # kept, without its content
    assert "X123" not in record["request"] and record["reply"] is None and record["input_tokens"] > 0
    assert "hello" in _audit(database_url, tenant.tenant_id, second)[0]["request"]  # the other one is kept
