"""A fixed set of model instances lent one request at a time, with a bounded first-come-first-served wait."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from keel.errors import OverloadedError

T = TypeVar("T")


class WorkerPool(Generic[T]):
    """`acquire` lends a free instance or waits in line; `release` hands it straight to the first in line.

    Handing over directly (rather than putting it back for anyone to grab) keeps the line fair: a newcomer
    cannot take an instance that a waiter was already woken for.
    """

    def __init__(self, instances: list[T], queue_size: int) -> None:
        self._size = len(instances)
        self._free = list(instances)
        self._queue_size = queue_size
        self._waiters: deque[asyncio.Future[T]] = deque()

    @property
    def busy(self) -> int:
        return self._size - len(self._free)

    @property
    def queued(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> T:
        if self._free and not self.queued:
            return self._free.pop()
        if self.queued >= self._queue_size:
            raise OverloadedError(
                f"local model busy: {self.busy} generating, {self.queued} queued; retry shortly",
                headers={"Retry-After": "1"},
            )
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Gone while waiting (client disconnected): leave the line, and pass on an instance handed over
            # in the same instant.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, instance: T) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return
        self._free.append(instance)

    def fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
