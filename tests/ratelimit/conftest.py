from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


async def connect() -> Redis:
    # No retries: a missing Redis should fail the test at once, not after backoff.
    client = Redis(host=REDIS_HOST, port=REDIS_PORT, retry=Retry(NoBackoff(), 0))
    try:
        await client.ping()
    except (RedisConnectionError, OSError) as exc:
        reason = str(exc)
    else:
        return client
    await client.aclose()
    pytest.fail(
        f"these tests need a real Redis at {REDIS_HOST}:{REDIS_PORT} and none answered ({reason}); "
        f"start one, e.g. `redis-server --port {REDIS_PORT}`",
        pytrace=False,
    )


@pytest_asyncio.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = await connect()
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def other_redis_client() -> AsyncIterator[Redis]:
    """A second connection pool, standing in for a second Keel process."""
    client = await connect()
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def prefix(redis_client: Redis) -> AsyncIterator[str]:
    name = f"keel:test:rl:{uuid.uuid4().hex}"
    yield name
    keys = [key async for key in redis_client.scan_iter(match=f"{name}:*")]
    if keys:
        await redis_client.delete(*keys)
