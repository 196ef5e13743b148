"""Rate limits shared by every Keel process on one Redis.

A hand-written Lua script rather than the `limits` library: that one has no way to correct a token
charge after the call and no concurrency leases. The script checks and takes requests, tokens and a
concurrency slot in one atomic step, on Redis's own clock (`TIME`), so processes with drifting clocks
still share one budget exactly. Redis 7 replicates a script's effects, which makes `TIME` allowed.

Per key, two Redis keys with the hash tag `{key}` (one cluster slot):
    PREFIX:{key}:b  hash  r, t (bucket levels), ts (microseconds); expires when both buckets are full
    PREFIX:{key}:c  zset  lease ids scored by expiry (microseconds); a crashed process's slots lapse

Leases are short (`lease_ttl`, 30 s) and renewed while their request runs: one heartbeat task per
limiter renews every live lease each `lease_ttl / 3`, so a process that dies frees its slots within
`lease_ttl`. A slot whose release failed (Redis away as the request ended) or whose acquire was cut off
mid-call (cancelled: the script may have taken a slot that nobody holds) is kept as *unreleased* and
removed by the next acquire on that key, inside the same script, or by the heartbeat: once Redis is back,
the next request is admitted without waiting for the lease to lapse.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from keel.ratelimit._base import Lease, RateLimitState, refusal, state_for
from keel.settings import TierLimits

log = logging.getLogger(__name__)

# Shared head: ARGV[1] rpm, ARGV[2] tpm; leaves now (µs), r and t refilled to now.
_REFILL = """
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local r, t = rpm, tpm
local saved = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
if saved[3] then
    local elapsed = math.max(0, now - tonumber(saved[3]))
    r = math.min(rpm, tonumber(saved[1]) + elapsed * rpm / 60000000)
    t = math.min(tpm, tonumber(saved[2]) + elapsed * tpm / 60000000)
end
local function store()
    local to_full = math.max((rpm - r) / rpm, (tpm - t) / tpm) * 60000
    redis.call('HSET', KEYS[1], 'r', string.format('%.17g', r), 't', string.format('%.17g', t), 'ts', now)
    redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(to_full)))
end
"""

# KEYS[1] bucket hash, KEYS[2] lease zset.
# ARGV[3] concurrent_requests, ARGV[4] estimated tokens, ARGV[5] lease id, ARGV[6] lease ttl (ms),
# ARGV[7...] unreleased lease ids of this key, removed first.
# Returns {taken (0/1), r, t, in flight}: levels after the take, or as seen when refused.
_ACQUIRE = (
    _REFILL
    + """
local concurrent, estimate = tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl_ms = tonumber(ARGV[6])
for i = 7, #ARGV do
    redis.call('ZREM', KEYS[2], ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local in_flight = redis.call('ZCARD', KEYS[2])
if r < 1 or t < estimate or in_flight >= concurrent then
    return {0, string.format('%.17g', r), string.format('%.17g', t), in_flight}
end
r = r - 1
t = t - estimate
store()
redis.call('ZADD', KEYS[2], now + ttl_ms * 1000, ARGV[5])
redis.call('PEXPIRE', KEYS[2], ttl_ms)
return {1, string.format('%.17g', r), string.format('%.17g', t), in_flight + 1}
"""
)

# KEYS[1] bucket hash; ARGV[3] tokens to reserve. Returns {taken (0/1), r, t}.
_RESERVE = (
    _REFILL
    + """
local estimate = tonumber(ARGV[3])
if t < estimate then
    return {0, string.format('%.17g', r), string.format('%.17g', t)}
end
t = t - estimate
store()
return {1, string.format('%.17g', r), string.format('%.17g', t)}
"""
)

# KEYS[1] bucket hash; ARGV[3] tokens to charge (negative: refund).
_SETTLE = (
    _REFILL
    + """
t = math.min(tpm, t - tonumber(ARGV[3]))
store()
"""
)

# KEYS[1] lease zset; ARGV[1] lease ttl (ms), ARGV[2...] lease ids. Only leases still there are renewed
# (XX): a lapsed or released one is never brought back. Returns how many were renewed.
_RENEW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local ttl_ms = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
    renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl_ms * 1000, ARGV[i])
end
if renewed > 0 and redis.call('PTTL', KEYS[1]) < ttl_ms then
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
return renewed
"""


class RedisRateLimiter:
    """Does not own `client`: whoever built it closes it. `aclose()` stops the heartbeat."""

    def __init__(self, client: Redis, *, prefix: str = "keel:rl", lease_ttl: float = 30.0) -> None:
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {lease_ttl}")
        self._client = client
        self._prefix = prefix
        self._lease_ttl = lease_ttl
        self._lease_ttl_ms = max(1, round(lease_ttl * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._renew = client.register_script(_RENEW)
        # Weakly held: a lease dropped without release (a bug) stops being renewed and lapses.
        self._live: weakref.WeakSet[_RedisLease] = weakref.WeakSet()
        # lease zset → {lease id: time.monotonic() after which it has lapsed by itself}
        self._unreleased: dict[str, dict[str, float]] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def unreleased(self) -> int:
        """Slots whose removal from Redis is still owed (Redis was away when their request ended)."""
        return sum(len(ids) for ids in self._unreleased.values())

    async def acquire(self, key: str, limits: TierLimits, estimated_tokens: int) -> Lease:
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, got {estimated_tokens}")
        bucket, leases = f"{self._prefix}:{{{key}}}:b", f"{self._prefix}:{{{key}}}:c"
        lease_id = uuid.uuid4().hex
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        owed = list(self._unreleased.get(leases, ()))
        args: list[str | int] = [rpm, tpm, limits.concurrent_requests, estimated_tokens, lease_id]
        args += [self._lease_ttl_ms, *owed]
        try:
            reply: list[Any] = await self._acquire(keys=[bucket, leases], args=args)
        except BaseException:
            # Cancelled or cut off mid-call: the script may have taken a slot that nobody holds now.
            # No await here (a second cancellation could interrupt it): it is removed later.
            self._owe(leases, lease_id)
            raise
        if owed:
            self._paid(leases, owed)
        taken, requests, tokens, in_flight = int(reply[0]), float(reply[1]), float(reply[2]), int(reply[3])
        if not taken:
            raise refusal(limits, estimated_tokens, requests, tokens, in_flight)
        state = state_for(limits, requests, tokens)
        lease = _RedisLease(self, bucket, leases, lease_id, limits, state, estimated_tokens)
        self._live.add(lease)
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._renew_forever(), name="keel-rate-limit-heartbeat")
        return lease

    async def aclose(self) -> None:
        """Stop renewing; leases still held lapse after `lease_ttl`."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    async def renew(self) -> None:
        """One heartbeat: renew every live lease, remove the slots still owed. Never raises RedisError."""
        by_key: dict[str, list[str]] = {}
        for lease in list(self._live):
            by_key.setdefault(lease._leases, []).append(lease._lease_id)
        for leases, ids in by_key.items():
            try:
                await self._renew(keys=[leases], args=[self._lease_ttl_ms, *ids])
            except RedisError as exc:
                log.warning("could not renew %d rate-limit leases on %s: %s", len(ids), leases, exc)
        now = time.monotonic()
        for leases, owed in list(self._unreleased.items()):
            ids = [lease_id for lease_id, lapses in owed.items() if lapses > now]
            try:
                if ids:
                    await self._client.zrem(leases, *ids)
            except RedisError as exc:
                log.warning("could not remove %d rate-limit leases on %s: %s", len(ids), leases, exc)
            else:
                self._paid(leases, list(owed))

    async def _renew_forever(self) -> None:
        try:
            while self._live or self._unreleased:
                await asyncio.sleep(self._lease_ttl / 3)
                await self.renew()
        finally:
            if self._heartbeat is asyncio.current_task():
                self._heartbeat = None

    def _owe(self, leases: str, lease_id: str) -> None:
        self._unreleased.setdefault(leases, {})[lease_id] = time.monotonic() + self._lease_ttl
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._renew_forever(), name="keel-rate-limit-heartbeat")

    def _paid(self, leases: str, ids: list[str]) -> None:
        owed = self._unreleased.get(leases)
        if owed is None:
            return
        for lease_id in ids:
            owed.pop(lease_id, None)
        if not owed:
            del self._unreleased[leases]

    async def _take(self, bucket: str, limits: TierLimits, tokens: int) -> RateLimitState:
        reply: list[Any] = await self._reserve(
            keys=[bucket], args=[limits.requests_per_minute, limits.tokens_per_minute, tokens]
        )
        taken, requests, level = int(reply[0]), float(reply[1]), float(reply[2])
        if not taken:
            raise refusal(limits, tokens, requests, level, 0, tokens_only=True)
        return state_for(limits, requests, level)

    async def _correct(self, bucket: str, limits: TierLimits, delta: int) -> None:
        try:
            await self._settle(
                keys=[bucket], args=[limits.requests_per_minute, limits.tokens_per_minute, delta]
            )
        except RedisError as exc:
            # Called from finally blocks, before the release: raising here would keep the slot.
            log.warning("could not settle %+d tokens on %s: %s", delta, bucket, exc)

    async def _free(self, lease: _RedisLease) -> None:
        self._live.discard(lease)
        try:
            await self._client.zrem(lease._leases, lease._lease_id)
        except BaseException as exc:
            # Called from finally blocks: raising here would hide the request's own outcome. The slot is
            # removed by the next acquire on this key, or the heartbeat, once Redis answers again.
            self._owe(lease._leases, lease._lease_id)
            if not isinstance(exc, RedisError):
                raise  # cancelled: still owed, and the cancellation goes on
            log.warning(
                "could not release rate-limit lease %s on %s; it is removed once Redis answers",
                lease._lease_id,
                lease._leases,
            )


class _RedisLease(Lease):
    __slots__ = ("__weakref__", "_bucket", "_lease_id", "_leases", "_limiter", "_limits")

    def __init__(
        self,
        limiter: RedisRateLimiter,
        bucket: str,
        leases: str,
        lease_id: str,
        limits: TierLimits,
        state: RateLimitState,
        estimated_tokens: int,
    ) -> None:
        super().__init__(state, estimated_tokens)
        self._limiter = limiter
        self._bucket = bucket
        self._leases = leases
        self._lease_id = lease_id
        self._limits = limits

    async def _take(self, tokens: int) -> RateLimitState:
        return await self._limiter._take(self._bucket, self._limits, tokens)

    async def _correct(self, delta: int) -> None:
        await self._limiter._correct(self._bucket, self._limits, delta)

    async def _free(self) -> None:
        await self._limiter._free(self)
