"""Rate limits shared by every Keel process on one Redis.

A hand-written Lua script rather than the `limits` library: that one has no way to correct a token
charge after the call and no concurrency leases. The script checks and takes requests, tokens and a
concurrency slot in one atomic step, on Redis's own clock (`TIME`), so processes with drifting clocks
still share one budget exactly. Redis 7 replicates a script's effects, which makes `TIME` allowed.

Per key, two Redis keys with the hash tag `{key}` (one cluster slot):
    PREFIX:{key}:b  hash  r, t (bucket levels), ts (microseconds); expires when both buckets are full
    PREFIX:{key}:c  zset  lease ids scored by expiry (microseconds); a crashed process's slots lapse
"""

from __future__ import annotations

import logging
import uuid
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
# ARGV[3] concurrent_requests, ARGV[4] estimated tokens, ARGV[5] lease id, ARGV[6] lease ttl (ms).
# Returns {taken (0/1), r, t, in flight}: levels after the take, or as seen when refused.
_ACQUIRE = (
    _REFILL
    + """
local concurrent, estimate = tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl_ms = tonumber(ARGV[6])
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

# KEYS[1] bucket hash; ARGV[3] tokens to charge (negative: refund).
_SETTLE = (
    _REFILL
    + """
t = math.min(tpm, t - tonumber(ARGV[3]))
store()
"""
)


class RedisRateLimiter:
    """Does not own `client`: whoever built it closes it."""

    def __init__(self, client: Redis, *, prefix: str = "keel:rl", lease_ttl: float = 900.0) -> None:
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {lease_ttl}")
        self._client = client
        self._prefix = prefix
        self._lease_ttl_ms = max(1, round(lease_ttl * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)

    async def acquire(self, key: str, limits: TierLimits, estimated_tokens: int) -> Lease:
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, got {estimated_tokens}")
        bucket, leases = f"{self._prefix}:{{{key}}}:b", f"{self._prefix}:{{{key}}}:c"
        lease_id = uuid.uuid4().hex
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        reply: list[Any] = await self._acquire(
            keys=[bucket, leases],
            args=[rpm, tpm, limits.concurrent_requests, estimated_tokens, lease_id, self._lease_ttl_ms],
        )
        taken, requests, tokens, in_flight = int(reply[0]), float(reply[1]), float(reply[2]), int(reply[3])
        if not taken:
            raise refusal(limits, estimated_tokens, requests, tokens, in_flight)
        state = state_for(limits, requests, tokens)
        return _RedisLease(self, bucket, leases, lease_id, limits, state, estimated_tokens)

    async def aclose(self) -> None:
        return None

    async def _correct(self, bucket: str, limits: TierLimits, delta: int) -> None:
        await self._settle(keys=[bucket], args=[limits.requests_per_minute, limits.tokens_per_minute, delta])

    async def _free(self, leases: str, lease_id: str) -> None:
        try:
            await self._client.zrem(leases, lease_id)
        except RedisError:
            # Called from finally blocks: raising here would hide the request's own outcome.
            # The slot lapses by itself after lease_ttl.
            log.warning("could not release rate-limit lease %s on %s; it expires by itself", lease_id, leases)


class _RedisLease(Lease):
    __slots__ = ("_bucket", "_lease_id", "_leases", "_limiter", "_limits")

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

    async def _correct(self, delta: int) -> None:
        await self._limiter._correct(self._bucket, self._limits, delta)

    async def _free(self) -> None:
        await self._limiter._free(self._leases, self._lease_id)
