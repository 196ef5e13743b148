"""Persisted conversations: prior turns in, new turns out, one tenant's data only."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.tables import conversation_messages, conversations
from keel.db.writer import WriteQueue, without_nul

log = logging.getLogger(__name__)

Message = dict[str, Any]

MAX_TRACKED = 100_000


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    created_at: datetime
    updated_at: datetime
    messages: list[Message]


def _history(tenant_id: uuid.UUID, conversation_id: str) -> Select[tuple[Any]]:
    return (
        select(conversation_messages.c.message)
        .where(conversation_messages.c.tenant_id == tenant_id)
        .where(conversation_messages.c.conversation_id == conversation_id)
        .order_by(conversation_messages.c.id)
    )


class ConversationStore:
    def __init__(self, engine: AsyncEngine, writes: WriteQueue) -> None:
        self._engine = engine
        self._writes = writes
        self._direct: set[asyncio.Task[None]] = set()
        # Conversations whose last reply this process queued: the next turn waits for it to be written,
        # so a fast client never sends its next message into a history that lacks the previous answer.
        self._queued: set[tuple[uuid.UUID, str]] = set()

    async def begin_turn(
        self, tenant_id: uuid.UUID, conversation_id: str, new: list[Message], request_id: str
    ) -> list[Message]:
        """Load the prior turns and durably store the new ones, in one transaction, before the model runs."""
        key = (tenant_id, conversation_id)
        if key in self._queued:
            self._queued.discard(key)
            if len(self._writes):
                await self._writes.flush()
            await self.drain()
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(conversations)
                .values(tenant_id=tenant_id, id=conversation_id)
                .on_conflict_do_update(index_elements=["tenant_id", "id"], set_={"updated_at": func.now()})
            )
            history: list[Message] = [
                row.message for row in await conn.execute(_history(tenant_id, conversation_id))
            ]
            if new:
                await conn.execute(
                    conversation_messages.insert(),
                    [self._row(tenant_id, conversation_id, m, request_id) for m in new],
                )
        return history

    def append_later(
        self, tenant_id: uuid.UUID, conversation_id: str, message: Message, request_id: str
    ) -> None:
        """Store a reply off the critical path; never dropped: a full queue falls back to a direct write."""
        row = self._row(tenant_id, conversation_id, message, request_id)
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
    def _row(tenant_id: uuid.UUID, conversation_id: str, message: Message, request_id: str) -> dict[str, Any]:
        return {
            "tenant_id": tenant_id,
            "conversation_id": conversation_id,
            "role": message["role"],
            "message": message,
            "request_id": request_id,
        }
