"""Breaker states shared through Redis, so that every replica skips a deployment another one found down.

Each transition a replica decides is written at once to `keel:breaker:NAME` (JSON: state, wall time of
the change, seconds left open), expiring when it stops mattering. Every `interval` seconds each replica
reads all keys in one MGET and adopts any state newer than its own. The request path never waits on
Redis; if Redis is away, breakers keep working per replica and a warning is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from keel.llm.resilience.breaker import CLOSED, OPEN, CircuitBreaker

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

PREFIX = "keel:breaker:"


class SharedBreakers:
    def __init__(self, redis: Redis, breakers: list[CircuitBreaker], *, interval: float) -> None:
        self._redis = redis
        self._breakers = {breaker.name: breaker for breaker in breakers}
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._failing = False
        for breaker in breakers:
            breaker.on_change = self._publish

    async def start(self) -> None:
        if self._breakers and self._task is None:
            await self.sync()
            self._task = asyncio.create_task(self._run(), name="keel-breaker-sync")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def sync(self) -> None:
        """Read every shared state once and adopt those newer than ours."""
        names = list(self._breakers)
        try:
            values = await self._redis.mget([PREFIX + name for name in names])
        except Exception as exc:  # Redis away: breakers go on per replica
            self._warn(exc)
            return
        self._failing = False
        for name, raw in zip(names, values, strict=True):
            if raw is not None:
                self._adopt(self._breakers[name], raw)

    def _adopt(self, breaker: CircuitBreaker, raw: Any) -> None:
        try:
            shared = orjson.loads(raw)
            state, changed_at, open_for = int(shared["state"]), float(shared["at"]), float(shared["open"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring malformed shared breaker state for %r", breaker.name)
            return
        if changed_at <= breaker.changed_at:
            return
        if state == OPEN:
            left = open_for - (time.time() - changed_at)
            if left > 0:
                breaker.force(OPEN, left)
                breaker.changed_at = changed_at
        elif state == CLOSED:
            breaker.force(CLOSED)
            breaker.changed_at = changed_at

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.sync()

    def _publish(self, breaker: CircuitBreaker) -> None:
        if breaker.state not in (OPEN, CLOSED):
            return  # half-open is each replica's own probe
        open_for = breaker.open_for()
        value = orjson.dumps({"state": breaker.state, "at": breaker.changed_at, "open": open_for})
        keep_ms = int((open_for + breaker.config.window) * 1000) + 1000
        task = asyncio.get_running_loop().create_task(self._write(PREFIX + breaker.name, value, keep_ms))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, value: bytes, keep_ms: int) -> None:
        try:
            await self._redis.set(key, value, px=keep_ms)
        except Exception as exc:  # the next transition or sync tries again
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.warning("circuit breaker states cannot be shared through Redis: %r", exc)
