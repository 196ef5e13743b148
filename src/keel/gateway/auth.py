"""API key → Principal, cached in process so the hot path never queries the database per request.

A key's answer (including "no such key") is cached for `ttl` seconds: a revoked key stops working
within that time (10 s by default). The cache keeps the `cache_size` most recently used answers, so a
flood of random keys evicts other random keys, not the keys in use. A string that cannot be a Keel key
(wrong prefix, length or alphabet) is refused without a database query. Every answer that is not a
cached valid key first passes the failure throttle of the client's address (`AuthThrottle`). Last-used
times collect in memory and are flushed periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime

from opentelemetry.trace import NoOpTracer, Tracer

from keel.errors import AuthenticationError, PermissionDeniedError
from keel.gateway.auth_throttle import AuthThrottle
from keel.telemetry.tracing import stage
from keel.tenants import Principal, TenantService
from keel.tenants.keys import well_formed

log = logging.getLogger(__name__)

MAX_CACHED_KEYS = 100_000


class Authenticator:
    def __init__(
        self,
        tenants: TenantService,
        *,
        ttl: float,
        flush_every: float,
        tracer: Tracer | None = None,
        cache_size: int = MAX_CACHED_KEYS,
        failures_per_minute: int = 30,
    ) -> None:
        self._tenants = tenants
        self._tracer = tracer or NoOpTracer()
        self._ttl = ttl
        self._flush_every = flush_every
        self._cache: OrderedDict[bytes, tuple[Principal | None, float]] = OrderedDict()
        self._cache_size = cache_size
        self._throttle = AuthThrottle(failures_per_minute)
        self._last_used: dict[uuid.UUID, float] = {}  # epoch seconds: a datetime per request costs more
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="keel-key-usage")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def authenticate(
        self, authorization: str | None, api_key: str | None = None, client: str | None = None
    ) -> Principal:
        """`client`: the caller's address, whose failed attempts are throttled."""
        with stage(self._tracer, "auth"):
            return await self._authenticate(authorization, api_key, client)

    async def _authenticate(
        self, authorization: str | None, api_key: str | None, client: str | None
    ) -> Principal:
        secret = _bearer(authorization) or api_key
        if not secret:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        cache_key = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] is not None and cached[1] > now:
            self._cache.move_to_end(cache_key)
            principal: Principal | None = cached[0]
        else:
            self._throttle.check(client)  # 429 while this address is over its failures
            if cached is not None and cached[1] > now:
                principal = None  # a known wrong key, still cached
            elif well_formed(secret):
                principal = await self._tenants.authenticate(secret)
                self._remember(cache_key, principal, now)
            else:
                principal = None  # cannot be a key: no query, and nothing cached
        if principal is None:
            self._throttle.failed(client)
            raise AuthenticationError("Incorrect API key provided.")
        if principal.expires_at is not None and principal.expires_at <= time.time():
            self._throttle.failed(client)
            expired = datetime.fromtimestamp(principal.expires_at, UTC).isoformat(timespec="seconds")
            raise AuthenticationError(f"This API key expired at {expired}.", code="expired_api_key")
        self._last_used[principal.key_id] = time.time()
        return principal

    def _remember(self, cache_key: bytes, principal: Principal | None, now: float) -> None:
        self._cache[cache_key] = (principal, now + self._ttl)
        self._cache.move_to_end(cache_key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)  # the least recently used

    def forget(self, key_id: uuid.UUID) -> None:
        """Drop a revoked key from this process's cache at once (other replicas: within the TTL)."""
        stale = [k for k, (who, _) in self._cache.items() if who is not None and who.key_id == key_id]
        for cache_key in stale:
            del self._cache[cache_key]

    async def flush(self) -> None:
        used, self._last_used = self._last_used, {}
        try:
            await self._tenants.record_last_used(
                {key: datetime.fromtimestamp(seen, UTC) for key, seen in used.items()}
            )
        except Exception:  # telemetry of key use must never fail a request; retry next round
            log.warning("could not record key last-used times; will retry", exc_info=True)
            self._last_used = used | self._last_used

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every)
            await self.flush()


def require_scope(principal: Principal, scope: str) -> None:
    """`admin` keys may do everything `chat` keys may."""
    if scope == "admin" and principal.scope != "admin":
        raise PermissionDeniedError("This endpoint needs a key with the 'admin' scope.")


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None
