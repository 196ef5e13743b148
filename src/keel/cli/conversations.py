"""`keel conversations`: list, show, delete and export a tenant's conversations.

Like the other data commands these work on the database from the same settings as `serve`, with or
without a running server. `delete` erases the content of the conversation's audit records too, as
`DELETE /v1/conversations/{id}` does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from keel.context import ConversationCatalog
from keel.db import Database
from keel.errors import KeelError, NotFoundError
from keel.settings import Settings
from keel.tenants import TenantService

T = TypeVar("T")

conversations_app = typer.Typer(help="Conversations: list, show, delete, export.", no_args_is_help=True)


class Format(StrEnum):
    table = "table"
    json = "json"


Tenant = Annotated[str, typer.Option("--tenant", help="Tenant name.")]
Output = Annotated[Format, typer.Option("--format", help="table for people, json for scripts.")]


def run(tenant: str, action: Callable[[ConversationCatalog, uuid.UUID], Awaitable[T]]) -> T:
    """Open the database, find the tenant, run `action(catalog, tenant_id)`; errors exit 1."""

    async def go() -> T:
        database = Database(Settings())
        try:
            engine = await database.open()
            found = await TenantService(engine).get_tenant(tenant)
            return await action(ConversationCatalog(engine), found.id)
        finally:
            await database.close()

    try:
        return asyncio.run(go())
    except KeelError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


async def _required(conversation_id: str, pending: Awaitable[T | None]) -> T:
    """What `pending` finds; a missing conversation (or another tenant's) exits 1."""
    found = await pending
    if found is None or found is False:
        raise NotFoundError(f"no conversation {conversation_id!r}")
    return found


def _echo_json(data: Any) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _metadata(pairs: list[str]) -> dict[str, str]:
    """`k=v` options → {k: v}."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, not {pair!r}", param_hint="--metadata")
        found[key] = value
    return found


def _since(value: str) -> datetime:
    try:
        parsed = (
            datetime.fromtimestamp(float(value), UTC)
            if value.replace(".", "", 1).isdigit()
            else datetime.fromisoformat(value)
        )
    except (ValueError, OverflowError, OSError):
        raise typer.BadParameter("expected ISO 8601 or Unix seconds", param_hint="--updated-since") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _text(message: dict[str, Any]) -> str:
    """A message's content for people: text parts joined, tool calls named."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", f"[{p.get('type')}]")) for p in content if isinstance(p, dict))
    calls = [c.get("function", {}).get("name", "?") for c in message.get("tool_calls") or []]
    return (content or "") + (f" [tool calls: {', '.join(calls)}]" if calls else "")


@conversations_app.command("list")
def list_conversations(
    tenant: Tenant = "default",
    user: Annotated[str | None, typer.Option("--user", help="Only this end user's.")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE; repeat to require several.")
    ] = None,
    updated_since: Annotated[
        str | None, typer.Option("--updated-since", help="ISO 8601 (UTC unless it says) or Unix seconds.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100)] = 20,
    after: Annotated[str | None, typer.Option("--after", help="The cursor a previous page printed.")] = None,
    output: Output = Format.table,
) -> None:
    """Newest update first, a page at a time."""
    wanted = _metadata(metadata or [])
    since = _since(updated_since) if updated_since is not None else None
    found, cursor = run(
        tenant,
        lambda catalog, tenant_id: catalog.list(
            tenant_id, user=user, metadata=wanted, updated_since=since, limit=limit, after=after
        ),
    )
    if output is Format.json:
        _echo_json({"object": "list", "data": found, "has_more": cursor is not None, "next_cursor": cursor})
        return
    typer.echo("id\tupdated\tuser\ttitle\tmetadata")
    for conversation in found:
        typer.echo(
            f"{conversation['id']}\t{_when(conversation['updated_at'])}\t{conversation['user'] or '-'}\t"
            f"{conversation['title'] or '-'}\t{orjson.dumps(conversation['metadata']).decode()}"
        )
    if cursor is not None:
        typer.echo(f"more: --after {cursor}")


@conversations_app.command("show")
def show(conversation_id: str, tenant: Tenant = "default", output: Output = Format.table) -> None:
    """One conversation: its messages with ids and token counts, and its newest summary."""
    found = run(
        tenant, lambda catalog, tenant_id: _required(conversation_id, catalog.get(tenant_id, conversation_id))
    )
    if output is Format.json:
        _echo_json(found)
        return
    typer.echo(f"{found['id']}  title: {found['title'] or '-'}  user: {found['user'] or '-'}")
    typer.echo(f"created {_when(found['created_at'])}  updated {_when(found['updated_at'])}")
    if found["metadata"]:
        typer.echo(f"metadata: {orjson.dumps(found['metadata']).decode()}")
    summary = found["summary"]
    if summary is not None:
        typer.echo(
            f"summary v{summary['version']} (to message {summary['covers_message_id']}): {summary['text']}"
        )
    for item in found["items"]:
        tokens = f"{item['tokens']} tokens" if item["tokens"] is not None else "not counted"
        typer.echo(f"[{item['id']}] {item['role']} ({tokens}): {_text(item['message'])}")


@conversations_app.command("delete")
def delete(
    conversation_id: str,
    tenant: Tenant = "default",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a conversation, its messages and summaries, and the content of its audit records."""
    if not yes:
        typer.confirm(f"Delete conversation {conversation_id!r} and erase its audit content?", abort=True)
    run(
        tenant,
        lambda catalog, tenant_id: _required(conversation_id, catalog.delete(tenant_id, conversation_id)),
    )
    typer.echo(f"deleted conversation {conversation_id}")


@conversations_app.command("export")
def export(
    conversation_id: str,
    tenant: Tenant = "default",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here, not to stdout.")] = None,
) -> None:
    """Everything stored for a conversation, as JSON: itself, every message, every summary."""
    found = run(
        tenant,
        lambda catalog, tenant_id: _required(conversation_id, catalog.export(tenant_id, conversation_id)),
    )
    if output is None:
        _echo_json(found)
        return
    output.write_bytes(orjson.dumps(found, option=orjson.OPT_INDENT_2))
    typer.echo(f"exported conversation {conversation_id} to {output}")
