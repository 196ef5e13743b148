"""Deadlines: the request's total (`CallTrace.deadline`) and each attempt's first-token and idle limits.

The per-attempt limits cost one timer per attempt, not one per event: a watchdog wakes when the current
limit could have passed, and only cancels the wait when the upstream really has been silent that long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from keel.errors import UpstreamTimeoutError
from keel.llm.base import ChatModel, Opened, open_stream
from keel.llm.events import ChatEvent, ChatRequest
from keel.llm.resilience._wrapper import WrapperModel, closing
from keel.llm.resilience.classify import FailureKind
from keel.llm.trace import CallTrace


def remaining(trace: CallTrace) -> float | None:
    """Seconds left before the request's deadline (never negative); None when it has none."""
    if trace.deadline is None:
        return None
    return max(0.0, trace.deadline - time.monotonic())


def expired(trace: CallTrace) -> bool:
    return trace.deadline is not None and time.monotonic() >= trace.deadline


_EARLY = 0.002  # timers may fire this early (uvloop counts in milliseconds)


class DeadlineModel(WrapperModel):
    """Gives the request its total deadline when the gateway set none (the CLI, evals, replays)."""

    def __init__(self, inner: ChatModel, total: float) -> None:
        super().__init__(inner)
        self.total = total

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        self._start(request)
        return self.inner.stream(request)

    async def open(self, request: ChatRequest) -> Opened:
        self._start(request)
        return await open_stream(self.inner, request)

    def _start(self, request: ChatRequest) -> None:
        if request.trace.deadline is None:
            request.trace.deadline = time.monotonic() + self.total


class AttemptTimeouts(WrapperModel):
    """One attempt must produce its first event within `first_token` seconds, then never fall silent for
    `idle` seconds, and never outlive the request's deadline; otherwise it fails with a timeout."""

    def __init__(self, inner: ChatModel, *, model: str, first_token: float, idle: float) -> None:
        super().__init__(inner)
        self.model = model
        self.first_token = first_token
        self.idle = idle

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        loop = asyncio.get_running_loop()
        left = remaining(request.trace)
        watch = _Watchdog(loop, self.first_token, self.idle, None if left is None else loop.time() + left)
        async with closing(self.inner.stream(request)) as events:
            try:
                while True:
                    task = watch.arm()
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        if watch.fired is not None and task.uncancel() == 0:
                            raise self._timeout(watch.fired) from None
                        raise
                    finally:
                        watch.waiting = False
                    watch.first = False
                    yield event
            finally:
                watch.stop()

    def _timeout(self, kind: FailureKind) -> UpstreamTimeoutError:
        what = {
            FailureKind.FIRST_TOKEN_TIMEOUT: f"sent nothing within {self.first_token:g} s",
            FailureKind.IDLE_TIMEOUT: f"went silent for {self.idle:g} s",
        }.get(kind, "ran past the request's deadline")
        return UpstreamTimeoutError(
            f"{self.provider} model {self.model!r} {what}",
            provider=self.provider,
            model=self.model,
            code=kind.value,
        )


class _Watchdog:
    __slots__ = (
        "_deadline",
        "_due",
        "_timer",
        "fired",
        "first",
        "first_token",
        "idle",
        "loop",
        "since",
        "task",
        "waiting",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, first_token: float, idle: float, deadline: float | None
    ) -> None:
        self.loop = loop
        self.first_token = first_token
        self.idle = idle
        self._deadline = deadline  # in loop time
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.task: asyncio.Task[object] | None = None
        self.first = True
        self.waiting = False
        self.since = 0.0
        self.fired: FailureKind | None = None

    def arm(self) -> asyncio.Task[object]:
        """Called before each wait: cheap, since it runs once per event. The task is looked up once: a
        stream is read by one task (the request's) from its first event to its last."""
        task = self.task
        if task is None:
            task = self.task = asyncio.current_task(self.loop)
            assert task is not None
        self.since = since = self.loop.time()
        self.waiting = True
        due = since + (self.first_token if self.first else self.idle)
        if self._deadline is not None and self._deadline < due:
            due = self._deadline
        if self._timer is None or due < self._due:
            self._schedule(due)
        return task

    def _limit(self) -> float:
        due = self.since + (self.first_token if self.first else self.idle)
        return due if self._deadline is None else min(due, self._deadline)

    def _schedule(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = due
        self._timer = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        self._timer = None
        if not self.waiting or self.task is None:
            return  # the next wait arms it again
        due = self._limit()
        now = self.loop.time()
        if now < due - _EARLY:
            self._schedule(due)
            return
        if self._deadline is not None and now >= self._deadline:
            self.fired = FailureKind.DEADLINE
        else:
            self.fired = FailureKind.FIRST_TOKEN_TIMEOUT if self.first else FailureKind.IDLE_TIMEOUT
        self.task.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
