"""A circuit breaker per deployment: closed → open on failures → half-open after a cooldown → closed.

Opens when, over the last `window` seconds, at least `min_calls` calls ended and `failure_ratio` of them
failed, or on `consecutive_failures` failures in a row. While open the deployment is skipped at once.
After `cooldown` one probe call is let through (half-open): success closes the breaker, failure opens it
again. Only health counts: a request the upstream rightly refused (400) or a client that left is neither.

Written here rather than taken from a library: purgatory and aiobreaker open on consecutive failures only
(no failure ratio over a window, no minimum of calls), and purgatory's Redis store costs a round trip on
every call; this one decides in-process and shares transitions through Redis (`keel.llm.resilience.
shared`) without touching Redis on the request path.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from keel.errors import KeelError
from keel.llm.base import ChatModel
from keel.llm.events import ChatEvent, ChatRequest
from keel.llm.resilience._wrapper import WrapperModel, closing
from keel.llm.resilience.classify import UNHEALTHY, CircuitOpenError, classify
from keel.llm.trace import LLMObserver
from keel.settings import BreakerConfig

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        observer: LLMObserver,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.state = CLOSED
        self.open_until = 0.0  # clock time; meaningful while open
        self.changed_at = time.time()  # wall time of the last transition, to order shared updates
        self.on_change: Callable[[CircuitBreaker], None] | None = None  # the Redis sync listens here
        self._observer = observer
        self._clock = clock
        self._probing = False
        self._consecutive = 0
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures], oldest first
        self._calls = 0
        self._failures = 0

    def available(self) -> bool:
        """Would a call be let through now? (No side effects: for choosing among deployments.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self._clock() >= self.open_until
        return not self._probing

    def open_for(self) -> float:
        """Seconds until a probe may go (0 unless open)."""
        return max(0.0, self.open_until - self._clock()) if self.state == OPEN else 0.0

    def acquire(self) -> bool | None:
        """Let a call through: False for a normal call, True for the half-open probe; None: skip."""
        if self.state == CLOSED:
            return False
        if self.state == OPEN:
            if self._clock() < self.open_until:
                return None
            self._transition(HALF_OPEN)
        if self._probing:
            return None
        self._probing = True
        return True

    def record(self, probe: bool, healthy: bool | None) -> None:
        """The call ended: healthy, unhealthy, or None when it tells nothing about the deployment."""
        if probe:
            self._probing = False
        if healthy is None:
            return
        if self.state != CLOSED:
            if probe or self.state == HALF_OPEN:
                self._transition(CLOSED if healthy else OPEN)
            return
        self._count(healthy)
        if healthy:
            self._consecutive = 0
            return
        self._consecutive += 1
        config = self.config
        if self._consecutive >= config.consecutive_failures or (
            self._calls >= config.min_calls and self._failures >= config.failure_ratio * self._calls
        ):
            self._transition(OPEN)

    def force(self, state: int, open_for: float = 0.0) -> None:
        """Adopt a state decided elsewhere (another replica)."""
        if state == OPEN:
            self.open_until = self._clock() + open_for
        if state != self.state:
            self._enter(state, announce=False)

    def _transition(self, state: int) -> None:
        if state == OPEN:
            self.open_until = self._clock() + self.config.cooldown
        self._enter(state, announce=True)

    def _enter(self, state: int, *, announce: bool) -> None:
        self.state = state
        self.changed_at = time.time()
        self._probing = False
        if state == CLOSED:
            self._consecutive = 0
            self._buckets.clear()
            self._calls = self._failures = 0
        self._observer.breaker_changed(self.name, state)
        if announce and self.on_change is not None:
            self.on_change(self)

    def _count(self, healthy: bool) -> None:
        now = int(self._clock())
        buckets = self._buckets
        horizon = now - self.config.window
        while buckets and buckets[0][0] <= horizon:
            _, calls, failures = buckets.popleft()
            self._calls -= calls
            self._failures -= failures
        if not buckets or buckets[-1][0] != now:
            buckets.append([now, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        self._calls += 1
        if not healthy:
            bucket[2] += 1
            self._failures += 1


class BreakerModel(WrapperModel):
    """Skips the deployment at once while its breaker is open; reports each call's health to it."""

    def __init__(self, inner: ChatModel, breaker: CircuitBreaker) -> None:
        super().__init__(inner)
        self.breaker = breaker

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        probe = self.breaker.acquire()
        if probe is None:
            raise CircuitOpenError(
                f"deployment {self.breaker.name!r} is skipped: its circuit breaker is open",
                provider=self.provider,
                model=self.breaker.name,
            )
        healthy: bool | None = None
        try:
            async with closing(self.inner.stream(request)) as events:
                async for event in events:
                    yield event
            healthy = True
        except KeelError as exc:
            healthy = False if classify(exc) in UNHEALTHY else None
            raise
        finally:
            self.breaker.record(probe, healthy)
