"""API key → Principal, cached in process so the hot path never queries the database per request.

A key's answer (including "no such key") is cached for `ttl` seconds: a revoked key stops working
within that time (10 s by default). Last-used times collect in memory and are flushed periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from datetime import UTC, datetime

from opentelemetry.trace import NoOpTracer, Tracer

from keel.errors import AuthenticationError, PermissionDeniedError
from keel.telemetry.tracing import stage
from keel.tenants import Principal, TenantService

log = logging.getLogger(__name__)

MAX_CACHED_KEYS = 100_000


class Authenticator:
    def __init__(
        self, tenants: TenantService, *, ttl: float, flush_every: float, tracer: Tracer | None = None
    ) -> None:
        self._tenants = tenants
        self._tracer = tracer or NoOpTracer()
        self._ttl = ttl
        self._flush_every = flush_every
        self._cache: dict[bytes, tuple[Principal | None, float]] = {}
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

    async def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        with stage(self._tracer, "auth"):
            return await self._authenticate(authorization, api_key)

    async def _authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        secret = _bearer(authorization) or api_key
        if not secret:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        cache_key = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            principal = await self._tenants.authenticate(secret)
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()  # bounded: a flood of random keys cannot grow memory
            self._cache[cache_key] = (principal, now + self._ttl)
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        self._last_used[principal.key_id] = time.time()
        return principal

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
