"""Failed authentication, throttled per client address: a guesser gets 429s, not database queries.

Each address has a token bucket of `per_minute` failures that refills continuously (per_minute / 60 per
second). A failure takes one token; with none left, every attempt from that address that is not a key
already verified by the cache gets 429 with `Retry-After` until a token is back. IPv6 addresses count
by their /64 (one host usually holds a whole /64). In process, bounded: the least recently failing
addresses are forgotten first.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict

from keel.errors import RateLimitError

MAX_ADDRESSES = 50_000


class AuthThrottle:
    def __init__(self, per_minute: int, *, max_addresses: int = MAX_ADDRESSES) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._max_addresses = max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address → (tokens, at)

    def check(self, client: str | None) -> None:
        """Raise 429 when this address has no failures left."""
        if not self._capacity:
            return
        tokens = self._tokens(_address(client), time.monotonic())
        if tokens < 1:
            retry_after = max(1, math.ceil((1 - tokens) / self._rate))
            raise RateLimitError(
                f"Too many failed authentication attempts from your address; retry in {retry_after} s.",
                code="too_many_failed_auth",
                headers={"Retry-After": str(retry_after)},
            )

    def failed(self, client: str | None) -> None:
        if not self._capacity:
            return
        address = _address(client)
        now = time.monotonic()
        self._buckets[address] = (self._tokens(address, now) - 1, now)
        self._buckets.move_to_end(address)
        while len(self._buckets) > self._max_addresses:
            self._buckets.popitem(last=False)

    def _tokens(self, address: str, now: float) -> float:
        found = self._buckets.get(address)
        if found is None:
            return self._capacity
        tokens, at = found
        return min(self._capacity, tokens + (now - at) * self._rate)


def _address(client: str | None) -> str:
    if not client:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)
