"""Telling every Keel process that a prompt changed, and serialising the writers of one prompt.

Inside the writing transaction: `pg_notify`, delivered by PostgreSQL only when the transaction commits.
After the commit: the optional `ChangePublisher` (Redis pub/sub, for deployments whose connection pooler
breaks LISTEN). Listeners drop what they cached for that prompt either way.
"""

from __future__ import annotations

import uuid
from typing import Protocol

import orjson
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.db.tables import prompts
from keel.errors import NotFoundError

CHANNEL = "keel_prompts"


class ChangePublisher(Protocol):
    async def changed(self, tenant_id: uuid.UUID, name: str) -> None:
        """Called after a change to the prompt committed."""


class NoPublisher:
    async def changed(self, tenant_id: uuid.UUID, name: str) -> None:
        return None


class Publishers:
    """Several publishers in order, e.g. this process's own cache first, then Redis."""

    def __init__(self, *publishers: ChangePublisher) -> None:
        self._publishers = publishers

    async def changed(self, tenant_id: uuid.UUID, name: str) -> None:
        for publisher in self._publishers:
            await publisher.changed(tenant_id, name)


def change_payload(tenant_id: uuid.UUID, name: str) -> str:
    return orjson.dumps({"tenant": str(tenant_id), "name": name}).decode()


def parse_payload(payload: str | bytes) -> tuple[uuid.UUID, str] | None:
    try:
        data = orjson.loads(payload)
        return uuid.UUID(data["tenant"]), str(data["name"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


async def notify(conn: AsyncConnection, tenant_id: uuid.UUID, name: str) -> None:
    await conn.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CHANNEL, "payload": change_payload(tenant_id, name)},
    )


async def lock_prompt(conn: AsyncConnection, tenant_id: uuid.UUID, name: str) -> uuid.UUID:
    """The prompt's id, its row locked until the transaction ends; 404 when there is no such prompt."""
    query = (
        select(prompts.c.id).where(prompts.c.tenant_id == tenant_id, prompts.c.name == name).with_for_update()
    )
    found: uuid.UUID | None = (await conn.execute(query)).scalar_one_or_none()
    if found is None:
        raise NotFoundError(f"No prompt {name!r}.", param="name", code="prompt_not_found")
    return found
