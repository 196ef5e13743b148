"""Per-tenant rate limits: requests and tokens per minute (token buckets) and concurrent requests.

`InMemoryRateLimiter` serves one process; `RedisRateLimiter` shares one budget between processes.
Both hand out a `Lease`: settle it with the real token count, release it when the response ends.
"""

from keel.ratelimit._base import Lease, RateLimiter, RateLimitState
from keel.ratelimit.memory import InMemoryRateLimiter
from keel.ratelimit.redis import RedisRateLimiter

__all__ = ["InMemoryRateLimiter", "Lease", "RateLimitState", "RateLimiter", "RedisRateLimiter"]
