"""What every limiter shares: the state a client sees, the lease, the refusal it gets."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from keel.errors import RateLimitError
from keel.settings import TierLimits


@dataclass(frozen=True, slots=True)
class RateLimitState:
    limit_requests: int
    remaining_requests: int
    limit_tokens: int
    remaining_tokens: int
    reset_requests: float  # seconds until the request bucket is full again
    reset_tokens: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
            "x-ratelimit-reset-requests": format_duration(self.reset_requests),
            "x-ratelimit-reset-tokens": format_duration(self.reset_tokens),
        }


class Lease(ABC):
    """One admitted request: holds a concurrency slot until released.

    A request is admitted in two steps: `acquire` (a request and a slot, before its body is read) and
    `reserve` (its token estimate, once the body is parsed). `end` settles and releases however the
    request ended: a failed settle never keeps the slot. `settle` and `release` never raise for the
    limiter's own storage (logged instead): they run in `finally` blocks.
    """

    __slots__ = ("_estimated_tokens", "_released", "_settled", "state")

    def __init__(self, state: RateLimitState, estimated_tokens: int) -> None:
        self.state = state
        self._estimated_tokens = estimated_tokens
        self._settled = False
        self._released = False

    async def reserve(self, tokens: int) -> None:
        """Take `tokens` more from the tokens-per-minute bucket, or raise the refusal (taking nothing)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if tokens == 0 or self._settled:
            return
        self.state = await self._take(tokens)
        self._estimated_tokens += tokens

    async def settle(self, actual_tokens: int) -> None:
        """Charge the difference between the real token count and the estimate; may leave a debt."""
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens}")
        if self._settled:
            return
        self._settled = True  # before the await, so two concurrent calls cannot both charge
        delta = actual_tokens - self._estimated_tokens
        if delta:
            await self._correct(delta)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        await self._free()

    async def end(self, actual_tokens: int) -> None:
        """Settle, then release, even when settling fails (or is cancelled)."""
        try:
            await self.settle(actual_tokens)
        finally:
            await self.release()

    @abstractmethod
    async def _take(self, tokens: int) -> RateLimitState: ...

    @abstractmethod
    async def _correct(self, delta: int) -> None: ...

    @abstractmethod
    async def _free(self) -> None: ...


class RateLimiter(Protocol):
    async def acquire(self, key: str, limits: TierLimits, estimated_tokens: int) -> Lease: ...

    async def aclose(self) -> None: ...


def format_duration(seconds: float) -> str:
    """As OpenAI writes resets (Go's duration format): "0s", "120ms", "1s", "1m26.4s", "6m0s".

    Rounded up to the millisecond, so waiting that long is always enough.
    """
    ms = math.ceil(round(seconds * 1000, 6))  # round first: 0.12 * 1000 is 120.00000000000001
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def state_for(limits: TierLimits, requests: float, tokens: float) -> RateLimitState:
    """The client's view of two bucket levels (which may be negative after a settle)."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    # Positional and int() rather than math.floor: this runs on every admitted request.
    return RateLimitState(
        rpm,
        int(requests) if requests > 0 else 0,
        tpm,
        int(tokens) if tokens > 0 else 0,
        (rpm - requests) * 60.0 / rpm,  # >= 0: a level never exceeds its capacity
        (tpm - tokens) * 60.0 / tpm,
    )


def refusal(
    limits: TierLimits,
    estimated_tokens: int,
    requests: float,
    tokens: float,
    in_flight: int,
    *,
    tokens_only: bool = False,
) -> RateLimitError:
    """The error for a refused acquire, given the levels it saw (nothing was taken). `tokens_only`: a
    refused `reserve`, whose request and slot were already taken (so they are no reason)."""
    state = state_for(limits, requests, tokens)
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    if estimated_tokens > tpm:
        # Waiting never helps, so no Retry-After.
        return RateLimitError(
            f"Request too large for the tier's tokens per minute limit: limit {tpm}, "
            f"requested {estimated_tokens}. Send fewer input tokens or a lower max_tokens.",
            code="request_too_large",
            headers=state.headers(),
        )
    reasons: list[str] = []
    wait = 0.0
    if requests < 1 and not tokens_only:
        wait = max(wait, (1 - requests) * 60.0 / rpm)
        reasons.append(f"requests per minute: limit {rpm}")
    if tokens < estimated_tokens:
        wait = max(wait, (estimated_tokens - tokens) * 60.0 / tpm)
        reasons.append(
            f"tokens per minute: limit {tpm}, remaining {state.remaining_tokens}, "
            f"requested {estimated_tokens}"
        )
    if in_flight >= limits.concurrent_requests and not tokens_only:
        # No refill time to compute: a slot frees when another request finishes.
        reasons.append(f"concurrent requests: limit {limits.concurrent_requests}, in flight {in_flight}")
    retry_after = max(1, math.ceil(round(wait, 6)))
    return RateLimitError(
        f"Rate limit reached on {'; '.join(reasons)}. Please try again in {format_duration(retry_after)}.",
        headers={"Retry-After": str(retry_after), **state.headers()},
    )
