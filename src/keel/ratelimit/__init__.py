"""Per-tenant rate limits: requests and tokens per minute (token buckets) and concurrent requests.

`InMemoryRateLimiter` serves one process; `RedisRateLimiter` shares one budget between processes.
Both hand out a `Lease`: reserve the token estimate once the request is parsed, settle it with the real
(or, when none arrived, estimated) token count, release it when the response ends.
"""

from keel.ratelimit._base import Lease, RateLimiter, RateLimitState
from keel.ratelimit.estimate import estimate_usage, output_tokens, prompt_tokens
from keel.ratelimit.memory import InMemoryRateLimiter
from keel.ratelimit.redis import RedisRateLimiter

__all__ = [
    "InMemoryRateLimiter",
    "Lease",
    "RateLimitState",
    "RateLimiter",
    "RedisRateLimiter",
    "estimate_usage",
    "output_tokens",
    "prompt_tokens",
]
