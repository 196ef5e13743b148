"""Persisted conversations: prior turns in, new turns out, one tenant's data only."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keel.context.window import Counter, Turn
from keel.db.group_commit import GroupCommit
from keel.db.tables import conversation_messages, conversation_summaries, conversations
from keel.db.writer import WriteQueue, without_nul
from keel.errors import InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)

Message = dict[str, Any]

MAX_TRACKED = 100_000
MIN_MESSAGE_TOKENS = 4  # every chat template spends at least this on a message's framing


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    created_at: datetime
    updated_at: datetime
    messages: list[Message]


@dataclass(frozen=True, slots=True)
class Summary:
    id: int
    text: str
    covers_message_id: int
    tokens: int
    tokenizer: str
    version: int


@dataclass(slots=True)
class History:
    """A conversation as a turn sees it: the messages after the newest summary (the newest ones only, when
    the load was bounded), then the turn's new messages; token counts by the alias's counter."""

    turns: list[Turn]
    summary: Summary | None
    users: int = 0  # user messages in the conversation, ever (the new turn's included)


# Open (or create) the conversation, count the new user turn, and read its owner and newest summary.
_OPEN_TURN = """
    WITH head AS (
        INSERT INTO conversations (tenant_id, id, end_user, turns) VALUES ($1, $2, $3, $4)
        ON CONFLICT (tenant_id, id)
        DO UPDATE SET updated_at = now(), turns = conversations.turns + EXCLUDED.turns
        RETURNING end_user, turns
    )
    SELECT head.end_user, head.turns, s.id AS summary_id, s.text, s.covers_message_id, s.tokens, s.tokenizer,
           s.version
    FROM head LEFT JOIN LATERAL (
        SELECT id, text, covers_message_id, tokens, tokenizer, version FROM conversation_summaries
        WHERE tenant_id = $1 AND conversation_id = $2 ORDER BY version DESC LIMIT 1
    ) s ON true
"""

_ALL_HISTORY = """
    SELECT id, message, tokens, tokenizer FROM conversation_messages
    WHERE tenant_id = $1 AND conversation_id = $2 AND id > $3 ORDER BY id
"""

# The newest messages after the summary whose stored token counts (an estimate from the JSON's length where
# none was stored) add up to the bound ($5). The index is read backwards and stops after $4 messages (every
# message takes a few tokens of template overhead, so no more can fit), so a 1,000-turn conversation costs
# what a 50-turn one does.
_BOUNDED_HISTORY = """
    SELECT id, message, tokens, tokenizer FROM (
        SELECT id, message, tokens, tokenizer, size, sum(size) OVER (ORDER BY id DESC) AS upto FROM (
            SELECT id, message, tokens, tokenizer, coalesce(tokens, length(message::text) / 3) AS size
            FROM conversation_messages
            WHERE tenant_id = $1 AND conversation_id = $2 AND id > $3
            ORDER BY id DESC
            LIMIT $4
        ) newest
    ) w
    WHERE upto - size < $5
    ORDER BY id
"""

_INSERT_TURNS = """
    INSERT INTO conversation_messages
        (tenant_id, conversation_id, role, message, request_id, tokens, tokenizer)
    SELECT $1, $2, role, message, $3, tokens, $4
    FROM unnest($5::text[], $6::jsonb[], $7::int[]) WITH ORDINALITY AS new (role, message, tokens, n)
    ORDER BY n
    RETURNING id
"""


def _history(tenant_id: uuid.UUID, conversation_id: str, after: int = 0) -> Select[Any]:
    m = conversation_messages.c
    return (
        select(m.id, m.message, m.tokens, m.tokenizer)
        .where(m.tenant_id == tenant_id, m.conversation_id == conversation_id, m.id > after)
        .order_by(m.id)
    )


class ConversationStore:
    def __init__(self, engine: AsyncEngine, writes: WriteQueue) -> None:
        self._engine = engine
        self._writes = writes
        self._replies = GroupCommit(engine, conversation_messages)
        self._direct: set[asyncio.Task[None]] = set()
        # Conversations whose last reply this process queued (not committed before the answer went out:
        # a replay, a path without a durable turn): the next turn waits for it to be written.
        self._queued: set[tuple[uuid.UUID, str]] = set()

    async def begin_turn(
        self,
        tenant_id: uuid.UUID,
        conversation_id: str,
        new: list[Message],
        request_id: str,
        *,
        counter: Counter,
        user: str | None = None,
        bound: int | None = None,
    ) -> History:
        """Load the history and durably store the new messages, in one transaction, before the model runs.

        A conversation is bound to the end user of its first turn: a turn naming another user (or none)
        gets 404, as if it did not exist. `bound`: load only about that many tokens of the newest history
        (the window cannot hold more); None loads everything after the summary."""
        key = (tenant_id, conversation_id)
        if key in self._queued:
            self._queued.discard(key)
            if len(self._writes):
                await self._writes.flush()
            await self.drain()
        new_turns = [Turn(m, counter.count_message(m)) for m in new]
        asking = sum(1 for m in new if m["role"] == "user")
        # The turn's hot path: asyncpg directly (prepared statements, 4 round trips in all); SQLAlchemy's
        # per-statement overhead was most of a 1,000-turn conversation's assembly time (bench/context.py).
        try:
            async with self._engine.connect() as sa_conn:
                conn: asyncpg.Connection = (await sa_conn.get_raw_connection()).driver_connection  # type: ignore[assignment]
                async with conn.transaction():
                    head = await conn.fetchrow(_OPEN_TURN, tenant_id, conversation_id, user, asking)
                    assert head is not None
                    if head["end_user"] is not None and head["end_user"] != user:
                        raise NotFoundError(f"No conversation {conversation_id!r}.", param="conversation_id")
                    summary = Summary(*head[2:]) if head["summary_id"] is not None else None
                    after = summary.covers_message_id if summary is not None else 0
                    history = History([], summary, head["turns"])
                    if bound is None:
                        rows = await conn.fetch(_ALL_HISTORY, tenant_id, conversation_id, after)
                    else:
                        rows = await conn.fetch(
                            _BOUNDED_HISTORY,
                            tenant_id,
                            conversation_id,
                            after,
                            bound // MIN_MESSAGE_TOKENS + 1,
                            bound,
                        )
                        # The oldest loaded group may be cut: a leading partial group (no user message at its
                        # head) goes too.
                        while rows and rows[0]["message"].get("role") != "user":
                            rows.pop(0)
                    history.turns = [
                        stored_turn(r["id"], r["message"], r["tokens"], r["tokenizer"], counter) for r in rows
                    ]
                    if new:
                        stored = await conn.fetch(
                            _INSERT_TURNS,
                            tenant_id,
                            conversation_id,
                            request_id,
                            counter.name,
                            [t.message["role"] for t in new_turns],
                            [orjson.dumps(t.message).decode() for t in new_turns],  # jsonb[] takes JSON text
                            [t.tokens for t in new_turns],
                        )
                        ids = sorted(row["id"] for row in stored)  # a bigserial: assigned in row order
                        new_turns = [
                            Turn(t.message, t.tokens, i) for t, i in zip(new_turns, ids, strict=True)
                        ]
        except asyncpg.DataError as exc:  # SQLSTATE class 22: a value no PostgreSQL text or JSON can hold
            nul = exc.sqlstate in ("22P05", "22021")  # a \u0000 escape in JSON, a 0x00 byte in text
            hint = " (PostgreSQL cannot store the NUL character \\u0000)" if nul else ""
            raise InvalidRequestError(
                f"The request holds a value that cannot be stored{hint}.", code="unstorable_value"
            ) from None
        history.turns.extend(new_turns)
        return history

    async def commit_reply(
        self,
        tenant_id: uuid.UUID,
        conversation_id: str,
        message: Message,
        request_id: str,
        *,
        tokens: int | None = None,
        tokenizer: str | None = None,
    ) -> int:
        """Store a turn's reply before the client gets its last byte; concurrent turns share a commit."""
        row = self._row(tenant_id, conversation_id, message, request_id, tokens, tokenizer)
        return await self._replies.write(without_nul(row))

    def append_later(
        self,
        tenant_id: uuid.UUID,
        conversation_id: str,
        message: Message,
        request_id: str,
        *,
        tokens: int | None = None,
        tokenizer: str | None = None,
    ) -> None:
        """Store a reply off the critical path; never dropped: a full queue falls back to a direct write."""
        row = self._row(tenant_id, conversation_id, message, request_id, tokens, tokenizer)
        if len(self._queued) >= MAX_TRACKED:
            self._queued.clear()  # bounded; the writes behind old entries are long done
        self._queued.add((tenant_id, conversation_id))
        if not self._writes.put(conversation_messages, row, urgent=True):  # the next turn reads it
            task = asyncio.create_task(self._write_direct(row))
            self._direct.add(task)
            task.add_done_callback(self._direct.discard)

    async def _write_direct(self, row: dict[str, Any]) -> None:
        try:
            async with self._engine.begin() as conn:
                # NUL (which a model may emit) is replaced here as the queue would on refusal
                await conn.execute(conversation_messages.insert(), [without_nul(row)])
        except Exception:  # reported here: nobody awaits this task's result
            log.exception("conversation %s: a reply could not be stored", row["conversation_id"])

    async def drain(self) -> None:
        await self._replies.drain()
        if self._direct:
            await asyncio.gather(*self._direct, return_exceptions=True)

    async def get(self, tenant_id: uuid.UUID, conversation_id: str) -> Conversation | None:
        async with self._engine.connect() as conn:
            head = (
                await conn.execute(
                    select(conversations)
                    .where(conversations.c.tenant_id == tenant_id)
                    .where(conversations.c.id == conversation_id)
                )
            ).one_or_none()
            if head is None:
                return None
            messages = [row.message for row in await conn.execute(_history(tenant_id, conversation_id))]
        return Conversation(head.id, head.created_at, head.updated_at, messages)

    @staticmethod
    def _row(
        tenant_id: uuid.UUID,
        conversation_id: str,
        message: Message,
        request_id: str,
        tokens: int | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        return {
            "tenant_id": tenant_id,
            "conversation_id": conversation_id,
            "role": message["role"],
            "message": message,
            "request_id": request_id,
            "tokens": tokens,
            "tokenizer": tokenizer,
        }


def stored_turn(
    row_id: int, message: Message, tokens: int | None, tokenizer: str | None, counter: Counter
) -> Turn:
    """A stored message; counted again only when it was counted by another tokenizer (or never)."""
    if tokens is None or tokenizer != counter.name:
        tokens = counter.count_message(message)
    return Turn(message, tokens, row_id)


async def _newest_summary(
    conn: AsyncConnection, tenant_id: uuid.UUID, conversation_id: str
) -> Summary | None:
    s = conversation_summaries.c
    row = (
        await conn.execute(
            select(s.id, s.text, s.covers_message_id, s.tokens, s.tokenizer, s.version)
            .where(s.tenant_id == tenant_id, s.conversation_id == conversation_id)
            .order_by(s.version.desc())
            .limit(1)
        )
    ).one_or_none()
    return Summary(*row) if row is not None else None
