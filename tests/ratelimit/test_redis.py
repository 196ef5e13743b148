from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from keel.errors import RateLimitError
from keel.ratelimit import Lease, RedisRateLimiter
from keel.settings import TierLimits
from keel.testing import TcpProxy

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]

# Small limits refill slowly (10 RPM: one request per 6 s), so nothing refills during a test.


def tier(rpm: int = 1000, tpm: int = 1_000_000, concurrent: int = 100) -> TierLimits:
    return TierLimits(requests_per_minute=rpm, tokens_per_minute=tpm, concurrent_requests=concurrent)


async def take(limiter: RedisRateLimiter, limits: TierLimits, tokens: int = 0, key: str = "t1") -> Lease:
    lease = await limiter.acquire(key, limits, tokens)
    await lease.release()
    return lease


async def test_exactly_rpm_requests_pass_then_the_next_is_refused(redis_client: Redis, prefix: str) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix), tier(rpm=10)
    remaining = [(await take(limiter, limits)).state.remaining_requests for _ in range(10)]
    assert remaining == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    with pytest.raises(RateLimitError) as refused:
        await take(limiter, limits)
    assert "requests per minute" in refused.value.message
    assert "limit 10" in refused.value.message
    assert refused.value.headers["Retry-After"] == "6"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    await take(limiter, limits, key="t2")  # another key, another budget


async def test_a_token_refusal_takes_nothing(redis_client: Redis, prefix: str) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix), tier(rpm=10, tpm=60, concurrent=1)
    assert (await take(limiter, limits, 40)).state.remaining_tokens == 20
    with pytest.raises(RateLimitError) as refused:
        await limiter.acquire("t1", limits, 30)
    assert "tokens per minute" in refused.value.message
    assert "requested 30" in refused.value.message
    assert refused.value.headers["Retry-After"] == "10"  # 10 tokens short at one a second
    with pytest.raises(RateLimitError) as too_large:
        await limiter.acquire("t1", limits, 61)
    assert too_large.value.code == "request_too_large"
    assert "Retry-After" not in too_large.value.headers
    lease = await limiter.acquire("t1", limits, 20)  # no request, token or slot was taken above
    assert (lease.state.remaining_requests, lease.state.remaining_tokens) == (8, 0)
    await lease.release()


async def test_settle_charges_debt_and_refunds_once(redis_client: Redis, prefix: str) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix), tier(tpm=60)  # a token a second
    lease = await limiter.acquire("t1", limits, 40)
    await lease.settle(10)  # 30 back
    await lease.settle(60)  # ignored: already settled
    await lease.release()
    assert (await take(limiter, limits, 0)).state.remaining_tokens == 50

    lease = await limiter.acquire("t1", limits, 10)
    await lease.settle(70)  # 60 more: 20 in debt
    await lease.release()
    with pytest.raises(RateLimitError, match="tokens per minute") as refused:
        await take(limiter, limits, 0)
    assert refused.value.headers["Retry-After"] == "20"


async def test_concurrency_release_is_idempotent(redis_client: Redis, prefix: str) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix), tier(concurrent=2)
    first = await limiter.acquire("t1", limits, 0)
    second = await limiter.acquire("t1", limits, 0)
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("t1", limits, 0)
    await first.release()
    await first.release()
    third = await limiter.acquire("t1", limits, 0)
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("t1", limits, 0)
    await second.release()
    await third.release()


async def test_release_survives_a_redis_error(
    redis_client: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisRateLimiter(redis_client, prefix=prefix)
    lease = await limiter.acquire("t1", tier(), 0)
    [leases] = [key async for key in redis_client.scan_iter(match=f"{prefix}:*:c")]
    await redis_client.set(leases, "not a sorted set")  # ZREM now fails with WRONGTYPE

    async def request_that_fails() -> None:
        try:
            raise TimeoutError("upstream timed out")
        finally:
            await lease.release()

    with pytest.raises(TimeoutError, match="upstream timed out"):  # not masked by the Redis error
        await request_that_fails()
    assert "could not release rate-limit lease" in caplog.text


async def test_a_lease_never_released_lapses_after_lease_ttl(redis_client: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis_client, prefix=prefix, lease_ttl=0.4)
    limits = tier(concurrent=2)
    await limiter.acquire("t1", limits, 0)  # never released, as if its process died mid-request
    await asyncio.sleep(0.25)
    live = await limiter.acquire("t1", limits, 0)  # also keeps the lease set itself from expiring
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("t1", limits, 0)
    await asyncio.sleep(0.2)  # the first lease is past its expiry, the second is not
    lease = await limiter.acquire("t1", limits, 0)
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("t1", limits, 0)
    await lease.release()
    await live.release()


async def test_idle_keys_expire(redis_client: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis_client, prefix=prefix, lease_ttl=30)
    lease = await limiter.acquire("t1", tier(rpm=10, tpm=600), 300)
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}:*")]
    assert len(keys) == 2
    ttls = sorted([await redis_client.pttl(key) for key in keys])
    # Bucket: full again in 30 s (300 of 600 tokens at 10/s). Leases: lease_ttl.
    assert 29_000 < ttls[0] <= 30_000
    assert 29_000 < ttls[1] <= 30_000
    await lease.release()


async def test_two_processes_share_one_budget_exactly(
    redis_client: Redis, other_redis_client: Redis, prefix: str
) -> None:
    one = RedisRateLimiter(redis_client, prefix=prefix)
    two = RedisRateLimiter(other_redis_client, prefix=prefix)
    limits = tier(rpm=10)
    for _ in range(5):
        await take(one, limits)
        await take(two, limits)
    for limiter in (one, two):
        with pytest.raises(RateLimitError, match="requests per minute"):
            await take(limiter, limits)


async def test_a_concurrent_burst_from_two_processes_admits_exactly_the_limit(
    redis_client: Redis, other_redis_client: Redis, prefix: str
) -> None:
    one = RedisRateLimiter(redis_client, prefix=prefix)
    two = RedisRateLimiter(other_redis_client, prefix=prefix)
    limits = tier(rpm=1000, tpm=60, concurrent=7)

    async def attempt(limiter: RedisRateLimiter) -> Lease | None:
        try:
            return await limiter.acquire("t1", limits, 1)
        except RateLimitError:
            return None

    leases = await asyncio.gather(*(attempt(one if i % 2 else two) for i in range(40)))
    admitted = [lease for lease in leases if lease is not None]
    assert len(admitted) == 7
    for lease in admitted:
        await lease.release()
    assert (await take(one, limits, 1)).state.remaining_tokens == 52


async def test_reserve_takes_tokens_or_refuses_for_tokens_alone(redis_client: Redis, prefix: str) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix), tier(rpm=10, tpm=60, concurrent=1)
    lease = await limiter.acquire("t1", limits, 0)  # the request and the slot, before the body is read
    await lease.reserve(40)
    assert lease.state.remaining_tokens == 20
    with pytest.raises(RateLimitError) as refused:
        await lease.reserve(30)
    assert "tokens per minute" in refused.value.message
    assert "concurrent" not in refused.value.message  # its own slot is no reason
    await lease.end(10)  # 40 reserved, 10 used: 30 back
    assert (await take(limiter, limits, 0)).state.remaining_tokens == 50
    await limiter.aclose()


async def test_a_settle_that_fails_is_logged_and_still_releases(
    redis_client: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix), tier(concurrent=1)
    lease = await limiter.acquire("t1", limits, 10)
    [bucket] = [key async for key in redis_client.scan_iter(match=f"{prefix}:*:b")]
    await redis_client.set(bucket, "not a hash")  # the settle script now fails with WRONGTYPE
    await lease.end(500)  # does not raise
    assert "could not settle" in caplog.text
    await redis_client.delete(bucket)
    await take(limiter, limits)  # the slot came back
    await limiter.aclose()


async def test_held_leases_are_renewed_and_a_dropped_one_lapses(redis_client: Redis, prefix: str) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix, lease_ttl=0.3), tier(concurrent=1)
    held = await limiter.acquire("t1", limits, 0)
    await asyncio.sleep(0.8)  # well past lease_ttl: the heartbeat kept it
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("t1", limits, 0)
    del held  # dropped without release (a bug): no longer renewed, so it lapses
    await asyncio.sleep(0.5)
    await take(limiter, limits)
    await limiter.aclose()


async def test_a_cancelled_acquire_leaves_no_slot_taken(
    redis_client: Redis, other_redis_client: Redis, prefix: str
) -> None:
    limiter, limits = RedisRateLimiter(redis_client, prefix=prefix), tier(concurrent=1)
    await take(limiter, limits)  # the scripts are loaded: the next acquire is one EVALSHA
    # Another connection keeps Redis busy; our acquire waits in its socket, and Redis runs it after the
    # busy script even though we gave up on it: a slot taken that nobody holds.

    async def keep_redis_busy() -> None:
        await other_redis_client.eval("local i = 0 while i < 40000000 do i = i + 1 end return i", 0)

    busy = asyncio.create_task(keep_redis_busy())
    await asyncio.sleep(0.05)
    acquiring = asyncio.create_task(limiter.acquire("t1", limits, 0))
    await asyncio.sleep(0.05)
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    await busy
    assert limiter.unreleased == 1
    await take(limiter, limits)  # admitted: the orphaned slot is removed inside this acquire
    assert limiter.unreleased == 0
    await limiter.aclose()


async def test_a_release_while_redis_is_away_is_done_once_it_is_back(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with TcpProxy("127.0.0.1", 6379) as proxy:
        client = Redis(host=proxy.host, port=proxy.port, retry=Retry(NoBackoff(), 0))
        try:
            limiter, limits = RedisRateLimiter(client, prefix=prefix), tier(concurrent=1)
            lease = await limiter.acquire("t1", limits, 10)
            proxy.cut()
            await lease.end(20)  # neither settles nor releases, and raises neither
            assert "could not release rate-limit lease" in caplog.text
            proxy.restore()
            await take(limiter, limits)  # admitted at once, not after lease_ttl
            await limiter.aclose()
        finally:
            await client.aclose()
