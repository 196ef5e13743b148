"""Retries of one alias, before its first event only: once an event is out, a failure is the caller's.

Retried: what can succeed on retry (429, 408, 409, 5xx overloads and errors, timeouts, resets). Exponential
backoff with full jitter, or the upstream's `retry-after-ms` / `Retry-After` when it sent one. Bounded by
`attempts` and by the request's deadline: a wait that would not end before the deadline (or is longer
than `max_wait`) is not waited, and the alias gives up so that its fallback can answer at once.
A deployment ruled out (refused connection, 401/403/404) is replaced at once by another, without counting.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Mapping

from keel.errors import KeelError
from keel.llm.base import ChatModel, Opened, open_stream
from keel.llm.events import ChatRequest
from keel.llm.resilience._wrapper import OpeningWrapper
from keel.llm.resilience.classify import DEPLOYMENT_FATAL, RETRYABLE, NoDeploymentLeftError, classify
from keel.llm.resilience.deadline import remaining
from keel.llm.trace import LLMObserver
from keel.settings import RetryConfig

_MAX_SKIPS = 64  # more deployments than any alias has: a guard, should the balancer not rule one out


class RetryModel(OpeningWrapper):
    def __init__(
        self,
        inner: ChatModel,
        config: RetryConfig,
        *,
        alias: str,
        observer: LLMObserver,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.config = config
        self.alias = alias
        self.observer = observer
        self._rng = rng or random.Random()

    async def open(self, request: ChatRequest) -> Opened:
        failures = skips = 0
        last: KeelError | None = None
        while True:
            try:
                return await open_stream(self.inner, request)
            except NoDeploymentLeftError:
                if last is None:
                    raise
                raise last from None
            except KeelError as exc:
                last = exc
                kind = classify(exc)
                if kind in DEPLOYMENT_FATAL and skips < _MAX_SKIPS:
                    skips += 1
                    continue  # the balancer rules that deployment out; another one, at once
                if kind not in RETRYABLE:
                    raise
                failures += 1
                delay = self.delay(failures, exc, remaining(request.trace))
                if failures >= self.config.attempts or delay is None:
                    raise
                self.observer.retried(self.alias, kind.value)
                if self.config.wait and delay > 0:
                    await asyncio.sleep(delay)

    def delay(self, failures: int, exc: KeelError, left: float | None) -> float | None:
        """Seconds to wait before the next attempt; None when waiting makes no sense (give up)."""
        hinted = retry_after(getattr(exc, "upstream_headers", {}))
        if hinted is not None:
            if hinted > self.config.max_wait:
                return None
            delay = hinted
        elif self.config.wait:
            ceiling = min(self.config.backoff_max, self.config.backoff_initial * 2 ** (failures - 1))
            delay = self._rng.uniform(0, ceiling)
        else:
            delay = 0.0  # tests: no backoff (an upstream's Retry-After is still weighed, though not slept)
        if left is not None and delay >= left:
            return None
        return delay


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The upstream's requested pause: `retry-after-ms` (OpenAI), else `retry-after` (seconds or a date)."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
