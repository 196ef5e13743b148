"""Rate limits for one Keel process: token buckets in a dict.

`acquire` never awaits between check and take, so on one event loop it is atomic without a lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from keel.ratelimit._base import Lease, RateLimitState, refusal, state_for
from keel.settings import TierLimits

_MIN_SWEEP = 1024


@dataclass(slots=True)
class _Bucket:
    requests: float
    tokens: float
    updated: float
    full_at: float  # from then on, with nothing in flight, the bucket equals a missing one
    in_flight: int = 0


class InMemoryRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._next_sweep = _MIN_SWEEP

    @property
    def tracked_keys(self) -> int:
        """Keys holding a bucket now; idle full buckets are dropped as new keys arrive."""
        return len(self._buckets)

    async def acquire(self, key: str, limits: TierLimits, estimated_tokens: int) -> Lease:
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, got {estimated_tokens}")
        now = self._clock()
        bucket = self._refilled(key, limits, now)
        if (
            bucket.requests < 1
            or bucket.tokens < estimated_tokens
            or bucket.in_flight >= limits.concurrent_requests
        ):
            raise refusal(limits, estimated_tokens, bucket.requests, bucket.tokens, bucket.in_flight)
        bucket.requests -= 1
        bucket.tokens -= estimated_tokens
        bucket.in_flight += 1
        bucket.full_at = _full_at(bucket, limits, now)
        state = state_for(limits, bucket.requests, bucket.tokens)
        return _MemoryLease(self, key, limits, state, estimated_tokens)

    async def aclose(self) -> None:
        self._buckets.clear()

    def _refilled(self, key: str, limits: TierLimits, now: float) -> _Bucket:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._next_sweep:
                self._sweep(now)
            bucket = self._buckets[key] = _Bucket(rpm, tpm, now, now)
            return bucket
        elapsed = max(0.0, now - bucket.updated)
        # min() also applies a lowered tier at once.
        bucket.requests = min(rpm, bucket.requests + elapsed * rpm / 60.0)
        bucket.tokens = min(tpm, bucket.tokens + elapsed * tpm / 60.0)
        bucket.updated = now
        return bucket

    def _sweep(self, now: float) -> None:
        # Runs only when the dict has doubled since the last sweep, so its cost is amortised O(1).
        idle = [k for k, b in self._buckets.items() if b.in_flight == 0 and b.full_at <= now]
        for k in idle:
            del self._buckets[k]
        self._next_sweep = max(_MIN_SWEEP, 2 * len(self._buckets))

    def _reserve(self, key: str, limits: TierLimits, tokens: int) -> RateLimitState:
        now = self._clock()
        bucket = self._refilled(key, limits, now)
        if bucket.tokens < tokens:
            raise refusal(limits, tokens, bucket.requests, bucket.tokens, bucket.in_flight, tokens_only=True)
        bucket.tokens -= tokens
        bucket.full_at = _full_at(bucket, limits, now)
        return state_for(limits, bucket.requests, bucket.tokens)

    def _correct(self, key: str, limits: TierLimits, delta: int) -> None:
        now = self._clock()
        bucket = self._refilled(key, limits, now)
        bucket.tokens = min(limits.tokens_per_minute, bucket.tokens - delta)
        bucket.full_at = _full_at(bucket, limits, now)

    def _free(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:  # always there: a bucket with a slot in use is never swept
            bucket.in_flight -= 1


def _full_at(bucket: _Bucket, limits: TierLimits, now: float) -> float:
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    return now + max((rpm - bucket.requests) * 60.0 / rpm, (tpm - bucket.tokens) * 60.0 / tpm)


class _MemoryLease(Lease):
    __slots__ = ("_key", "_limiter", "_limits")

    def __init__(
        self,
        limiter: InMemoryRateLimiter,
        key: str,
        limits: TierLimits,
        state: RateLimitState,
        estimated_tokens: int,
    ) -> None:
        super().__init__(state, estimated_tokens)
        self._limiter = limiter
        self._key = key
        self._limits = limits

    async def _take(self, tokens: int) -> RateLimitState:
        return self._limiter._reserve(self._key, self._limits, tokens)

    async def _correct(self, delta: int) -> None:
        # By key, not by bucket object: after release the bucket may have been swept and recreated.
        self._limiter._correct(self._key, self._limits, delta)

    async def _free(self) -> None:
        self._limiter._free(self._key)
