"""Hearing of prompt changes from every Keel process: PostgreSQL LISTEN, or Redis pub/sub when configured.

One connection per process listens. While it is connected the cache is on; when it drops (a database
restart, a network cut, a failed health check) the cache is switched off at once — no cached answer can
be trusted after a change we may not hear of — and the listener reconnects with backoff. On reconnecting it
clears the cache, because changes made while it was away were never heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.engine import make_url

from keel.prompts.cache import PromptCache
from keel.prompts.changes import CHANNEL, change_payload, parse_payload

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

APPLICATION_NAME = "keel-prompts-listener"


def asyncpg_dsn(url: str) -> str:
    """SQLAlchemy's `postgresql+asyncpg://...` (or plain) URL as asyncpg takes it."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1)).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class _Listener:
    """The connect-listen-watch-reconnect loop; subclasses say how to connect and how to wait."""

    def __init__(self, cache: PromptCache, *, health_seconds: float = 5.0) -> None:
        self._cache = cache
        self._health = health_seconds
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._was_up = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"keel-{type(self).__name__}")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._cache.reset(enabled=False)

    def heard(self, payload: str | bytes) -> None:
        parsed = parse_payload(payload)
        if parsed is None:
            log.warning("prompt change notice not understood: %r", payload[:200])
            self._cache.reset(enabled=self._cache.enabled)  # drop everything rather than guess
            return
        self._cache.invalidate(*parsed)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._session()
                delay = 0.1
            except Exception as exc:  # the connection is gone; cache off, then try again
                self._lost()
                level = logging.WARNING if self._was_up else logging.DEBUG  # one warning per outage
                self._was_up = False
                log.log(level, "prompt change listener lost (%s); reconnecting", exc or type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _joined(self) -> None:
        self._cache.reset(enabled=True)
        self._was_up = True
        self.connected.set()

    def _lost(self) -> None:
        self._cache.reset(enabled=False)
        self.connected.clear()

    async def _session(self) -> None:
        raise NotImplementedError


class PostgresListener(_Listener):
    def __init__(self, url: str, cache: PromptCache, *, health_seconds: float = 5.0) -> None:
        super().__init__(cache, health_seconds=health_seconds)
        self._dsn = asyncpg_dsn(url)

    async def _session(self) -> None:
        conn: Any = await asyncpg.connect(
            self._dsn, timeout=5, server_settings={"application_name": APPLICATION_NAME}
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, lambda _c, _pid, _channel, payload: self.heard(payload))
            self._joined()  # LISTEN is active: anything cached from now on will hear of its change
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self._health)
                if lost.is_set() or conn.is_closed():
                    raise ConnectionError("the listening connection closed")
                await conn.fetchval("SELECT 1", timeout=self._health)
        finally:
            self._lost()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)


class RedisListener(_Listener):
    def __init__(self, url: str, cache: PromptCache, *, health_seconds: float = 5.0) -> None:
        super().__init__(cache, health_seconds=health_seconds)
        self._url = url

    async def _session(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import (
            Retry,
        )  # the asyncio one: redis-py 8 warns on (and converts) the sync one
        from redis.backoff import NoBackoff

        # No silent reconnects: a reconnect we are not told of is a gap in which changes go unheard.
        client = Redis.from_url(self._url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=5)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            self._joined()
            pinged = False
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._health)
                if message is None:
                    if pinged:  # a whole health interval without the answer: the line is dead
                        raise ConnectionError("Redis did not answer the listener's ping")
                    await pubsub.ping()
                    pinged = True
                elif message.get("type") == "message":
                    self.heard(message["data"])
                else:
                    pinged = False  # the pong
        finally:
            self._lost()
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()


class RedisPublisher:
    """After a change commits, tell the Redis listeners (PostgreSQL's own NOTIFY went out regardless)."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def changed(self, tenant_id: uuid.UUID, name: str) -> None:
        try:
            await self._client.publish(CHANNEL, change_payload(tenant_id, name))
        except Exception:  # committed all the same; Redis listeners keep the old entry until the next change
            log.exception("could not publish the change of prompt %s to Redis", name)
