"""Signed webhooks for budget events, sent off the request path with bounded retries.

Each event is POSTed as JSON with `X-Keel-Signature: t=UNIX_SECONDS,v1=HEX`, where HEX is the
HMAC-SHA256 of `"{t}.{body}"` under `costs.webhook_secret` (the scheme Stripe uses: the timestamp in the
signed text stops replays of old events). A delivery that fails (no answer, or a status that is not 2xx)
is retried with exponential backoff and full jitter, up to `webhook_attempts` tries; each event is sent
once per threshold per window because the database records the crossing first (budget_alerts).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from typing import Any

import orjson

from keel.llm.http import HttpClient, HTTPError

log = logging.getLogger(__name__)

MAX_PENDING = 1_000


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300.0) -> bool:
    """For receivers (and tests): the signature matches and is at most `tolerance` seconds old."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)


class WebhookSender:
    def __init__(
        self,
        client: HttpClient,
        url: str,
        secret: str,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self._client = client
        self._url = url
        self._secret = secret
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    def send(self, event: dict[str, Any]) -> None:
        """Deliver in the background; beyond MAX_PENDING deliveries in flight the event is only logged."""
        if len(self._tasks) >= MAX_PENDING:
            log.error("webhooks: %d deliveries pending; dropped %s", len(self._tasks), event.get("type"))
            self.failed += 1
            return
        task = asyncio.create_task(self._deliver(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a drain deadline
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()

    async def _deliver(self, event: dict[str, Any]) -> None:
        body = orjson.dumps(event | {"sent_at": int(time.time())})
        for attempt in range(self._attempts):
            try:
                if await self._post(body):
                    self.delivered += 1
                    return
            except (OSError, TimeoutError, ValueError, HTTPError) as exc:
                log.info("webhooks: delivery attempt %d failed: %s", attempt + 1, exc)
            if attempt + 1 < self._attempts:
                await asyncio.sleep(random.uniform(0, self._backoff * 2**attempt))
        self.failed += 1
        log.error("webhooks: %s not delivered after %d attempts", event.get("type"), self._attempts)

    async def _post(self, body: bytes) -> bool:
        headers = {
            "content-type": "application/json",
            "user-agent": "keel-webhooks",
            "x-keel-signature": signature(self._secret, int(time.time()), body),
        }
        response = await self._client.request(
            "POST", self._url, headers=headers, body=body, total=self._timeout
        )
        try:
            await response.read()
        except BaseException:
            response.close()
            raise
        response.release()
        return 200 <= response.status < 300
