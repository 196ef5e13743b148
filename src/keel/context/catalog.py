"""Conversations as a product: list, read, rename, tag, delete and export them, one tenant's only.

The chat path (`conversations.py`) writes turns; this module is the read and manage side. Every query is
scoped to a tenant, and `user` (an end user named by the request) hides a conversation bound to another
end user: such a conversation, like another tenant's, is indistinguishable from a missing one.

Deleting a conversation removes its messages and summaries (foreign keys cascade) and erases the content
of its audit records in the same transaction, keeping their metadata (model, parameters, tokens, timings,
status): a user's "delete my data" deletes. Page cursors are opaque: base64 of the last conversation's
update time and id, nothing a tenant cannot already see.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    delete,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keel.db.cursor import decode_cursor, encode_cursor
from keel.db.tables import audit_requests, conversation_messages, conversation_summaries, conversations
from keel.db.writer import WriteQueue
from keel.errors import InvalidRequestError, PermissionDeniedError

log = logging.getLogger(__name__)

MAX_PAGE = 100
# Metadata as OpenAI bounds it: 16 pairs, keys up to 64 characters, string values up to 512.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_TITLE_CHARS = 512
MAX_USER_CHARS = 256
FLUSH_BEFORE_DELETE_SECONDS = 5.0  # how long a delete waits for this process's queued audit records
# The audit record's context decision without content: every top-level field that holds no string at
# any depth (token counts, message and summary ids, turns dropped), and these, which name no content.
CONTEXT_KEPT_STRINGS = ("kind", "strategy", "tokenizer")

Records = list[dict[str, Any]]  # JSON objects, as the API answers them

_c = conversations.c
_m = conversation_messages.c
_s = conversation_summaries.c
_a = audit_requests.c

_CONTEXT_WITHOUT_CONTENT: ColumnElement[Any] = literal_column(
    "CASE WHEN jsonb_typeof(audit_requests.context) = 'object' THEN ("
    "SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb) FROM jsonb_each(audit_requests.context) "
    "WHERE NOT jsonb_path_exists(value, 'strict $.** ? (@.type() == \"string\")') "
    f"OR (key IN ({', '.join(repr(k) for k in CONTEXT_KEPT_STRINGS)}) AND jsonb_typeof(value) = 'string')"
    ") END"
)


class ConversationCatalog:
    """`user`, where a method takes it, is the end user the request names (None: none named, or an
    admin key, which sees every conversation of its tenant)."""

    def __init__(self, engine: AsyncEngine, writes: WriteQueue | None = None) -> None:
        self._engine = engine
        self._writes = writes  # the process's write queue: a delete first lets queued audit records land

    async def list(
        self,
        tenant_id: uuid.UUID,
        *,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        updated_since: datetime | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> tuple[Records, str | None]:
        """Newest update first. Returns the conversations and the next page's cursor (None at the end).
        `user` here filters: only the conversations bound to that end user."""
        query = select(conversations).where(_c.tenant_id == tenant_id)
        if user is not None:
            query = query.where(_c.end_user == user)
        if metadata:
            query = query.where(_c["metadata"].contains(dict(metadata)))
        if updated_since is not None:
            query = query.where(_c.updated_at >= updated_since)
        if after is not None:
            query = query.where(tuple_(_c.updated_at, _c.id) < decode_cursor(after))
        query = query.order_by(_c.updated_at.desc(), _c.id.desc()).limit(limit + 1)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = encode_cursor(rows[-1].updated_at, rows[-1].id) if more and rows else None
        return [conversation_json(r) for r in rows], cursor

    async def get(
        self, tenant_id: uuid.UUID, conversation_id: str, *, user: str | None = None
    ) -> dict[str, Any] | None:
        """The conversation, every message with its id and token count, and its newest summary."""
        found = await self._read(tenant_id, conversation_id, user, newest_summary_only=True)
        if found is None:
            return None
        head, items, summaries = found
        return conversation_json(head) | {
            "summary": summaries[0] if summaries else None,
            "messages": [item["message"] for item in items],  # as sent and produced, OpenAI format
            "items": items,
        }

    async def export(
        self, tenant_id: uuid.UUID, conversation_id: str, *, user: str | None = None
    ) -> dict[str, Any] | None:
        """Everything stored for the conversation: itself, every message, every summary version."""
        found = await self._read(tenant_id, conversation_id, user, newest_summary_only=False)
        if found is None:
            return None
        head, items, summaries = found
        return {
            "object": "conversation.export",
            "exported_at": int(datetime.now(UTC).timestamp()),
            "conversation": conversation_json(head),
            "messages": items,
            "summaries": summaries,  # newest first
        }

    async def _read(
        self, tenant_id: uuid.UUID, conversation_id: str, user: str | None, *, newest_summary_only: bool
    ) -> tuple[Row[Any], Records, Records] | None:
        async with self._engine.connect() as conn:
            head = await _head(conn, tenant_id, conversation_id, user)
            if head is None:
                return None
            items = await _messages(conn, tenant_id, conversation_id)
            summaries = await _summaries(conn, tenant_id, conversation_id, newest_only=newest_summary_only)
        return head, items, summaries

    async def update(
        self,
        tenant_id: uuid.UUID,
        conversation_id: str,
        changes: Mapping[str, Any],
        *,
        user: str | None = None,
        rebind: bool = False,
    ) -> dict[str, Any] | None:
        """Set any of `title` (None clears it), `metadata` (replaces it; None empties it) and `user` (binds
        the conversation to an end user; None unbinds it; once bound, only with `rebind`, which admin keys
        have, can it change)."""
        values = validated_changes(changes)
        async with self._engine.begin() as conn:
            head = await _head(conn, tenant_id, conversation_id, user, for_update=True)
            if head is None:
                return None
            if "end_user" in values and head.end_user not in (None, values["end_user"]) and not rebind:
                raise PermissionDeniedError(
                    "This conversation is bound to an end user; only an admin key can change that.",
                    param="user",
                )
            row = (
                await conn.execute(
                    update(conversations)
                    .where(_c.tenant_id == tenant_id, _c.id == conversation_id)
                    .values(**values, updated_at=func.now())
                    .returning(*conversations.c)
                )
            ).one()
        return conversation_json(row)

    async def delete(self, tenant_id: uuid.UUID, conversation_id: str, *, user: str | None = None) -> bool:
        """Delete the conversation, its messages and summaries, and the content of its audit records."""
        if self._writes is not None and len(self._writes):
            try:  # the records of its last turns may still wait in this process's queue
                await asyncio.wait_for(self._writes.flush(), FLUSH_BEFORE_DELETE_SECONDS)
            except TimeoutError:
                log.warning("conversation delete: the write queue did not drain in time; deleting anyway")
        async with self._engine.begin() as conn:
            gone = await conn.execute(
                delete(conversations)
                .where(_c.tenant_id == tenant_id, _c.id == conversation_id, _visible_to(user))
                .returning(_c.id)
            )
            if gone.one_or_none() is None:
                return False
            await conn.execute(
                update(audit_requests)
                .where(_a.tenant_id == tenant_id, _a.conversation_id == conversation_id)
                .values(
                    # the model and parameters stay; what was said goes
                    request=func.jsonb_set(_a.request, literal_column("'{messages}'"), text("'null'::jsonb")),
                    reply=null(),
                    retrieved=text("'[]'::jsonb"),
                    context=_CONTEXT_WITHOUT_CONTENT,
                )
            )
        return True


def validated_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """The columns to set, each within its cap; a 400 naming the field otherwise."""
    values: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "title":
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TITLE_CHARS):
                raise InvalidRequestError(
                    f"'title' must be a string of at most {MAX_TITLE_CHARS} characters.", param="title"
                )
            values["title"] = value
        elif name == "metadata":
            values["metadata"] = validated_metadata(value if value is not None else {})
        elif name == "user":
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_USER_CHARS):
                raise InvalidRequestError(
                    f"'user' must be a string of 1 to {MAX_USER_CHARS} characters, or null.", param="user"
                )
            values["end_user"] = value
        else:
            raise InvalidRequestError(f"Unknown field {name!r}: give title, metadata or user.", param=name)
    return values


def validated_metadata(value: Any) -> dict[str, str]:
    """At most 16 pairs of strings, keys up to 64 characters, values up to 512."""
    if not isinstance(value, dict):
        raise InvalidRequestError("'metadata' must be an object of strings.", param="metadata")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidRequestError(
            f"'metadata' has {len(value)} keys; at most {MAX_METADATA_KEYS} are allowed.", param="metadata"
        )
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METADATA_KEY_CHARS:
            raise InvalidRequestError(
                f"'metadata' keys must be 1 to {MAX_METADATA_KEY_CHARS} characters: {str(key)[:80]!r}.",
                param="metadata",
            )
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequestError(
                f"'metadata.{key}' must be a string of at most {MAX_METADATA_VALUE_CHARS} characters.",
                param="metadata",
            )
    return dict(value)


def conversation_json(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "conversation",
        "created_at": int(row.created_at.timestamp()),
        "updated_at": int(row.updated_at.timestamp()),
        "user": row.end_user,
        "title": row.title,
        "metadata": row.metadata,
    }


def _visible_to(user: str | None) -> ColumnElement[bool]:
    """A conversation bound to an end user is hidden from a request that names another one."""
    if user is None:
        return true()
    return or_(_c.end_user.is_(None), _c.end_user == user)


async def _head(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    conversation_id: str,
    user: str | None,
    *,
    for_update: bool = False,
) -> Row[Any] | None:
    query = select(conversations).where(
        _c.tenant_id == tenant_id, _c.id == conversation_id, _visible_to(user)
    )
    if for_update:
        query = query.with_for_update()
    return (await conn.execute(query)).one_or_none()


async def _messages(
    conn: AsyncConnection, tenant_id: uuid.UUID, conversation_id: str
) -> list[dict[str, Any]]:
    query = (
        select(_m.id, _m.role, _m.message, _m.request_id, _m.created_at, _m.tokens, _m.tokenizer)
        .where(_m.tenant_id == tenant_id, _m.conversation_id == conversation_id)
        .order_by(_m.id)
    )
    return [
        {
            "id": row.id,
            "object": "conversation.message",
            "role": row.role,
            "created_at": int(row.created_at.timestamp()),
            "tokens": row.tokens,  # None: not counted when it was written
            "tokenizer": row.tokenizer,
            "request_id": row.request_id,
            "message": row.message,
        }
        for row in await conn.execute(query)
    ]


async def _summaries(
    conn: AsyncConnection, tenant_id: uuid.UUID, conversation_id: str, *, newest_only: bool
) -> list[dict[str, Any]]:
    query = (
        select(conversation_summaries)
        .where(_s.tenant_id == tenant_id, _s.conversation_id == conversation_id)
        .order_by(_s.version.desc())
    )
    if newest_only:
        query = query.limit(1)
    return [
        {
            "id": row.id,
            "object": "conversation.summary",
            "version": row.version,
            "text": row.text,
            "covers_message_id": row.covers_message_id,
            "model": row.model,
            "tokens": row.tokens,
            "tokenizer": row.tokenizer,
            "prompt": row.prompt,
            "request_id": row.request_id,
            "created_at": int(row.created_at.timestamp()),
        }
        for row in await conn.execute(query)
    ]
