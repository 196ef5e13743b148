"""GET /readyz: can this replica serve? Database and schema, write queue, every configured provider.

Remote providers are checked cheaply (GET {base}/models, no paid completion unless enabled) and the answer
is cached for `readiness_cache_seconds`, so a load balancer probing every second costs nothing upstream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db import WriteQueue, current_revision, head_revision
from keel.llm import ModelRegistry
from keel.llm.http import HttpClient, HTTPError
from keel.settings import ModelConfig, Settings

SATURATED = 0.9  # a write queue this full is not ready for more traffic


@dataclass(slots=True)
class Check:
    ok: bool
    detail: str

    def json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


class Readiness:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        writes: WriteQueue,
        models: ModelRegistry,
        client: HttpClient,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._writes = writes
        self._models = models
        self._client = client
        self._cache: dict[str, tuple[Check, float]] = {}
        self._probing: dict[str, asyncio.Future[Check]] = {}  # one probe per alias at a time

    async def check(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        names = ["database", "write_queue", *(f"model:{alias}" for alias in self._settings.models)]
        results = await asyncio.gather(
            self._database(), self._write_queue(), *(self._model(a) for a in self._settings.models)
        )
        checks = dict(zip(names, results, strict=True))
        return all(c.ok for c in checks.values()), {name: c.json() for name, c in checks.items()}

    async def _database(self) -> Check:
        try:
            current = await asyncio.wait_for(current_revision(self._engine), 5)
        except Exception as exc:  # any failure to reach it is "not ready", with the reason
            return Check(False, f"unreachable: {type(exc).__name__}")
        head = head_revision()
        if current != head:
            return Check(False, f"schema at {current}, code expects {head}: run `keel db upgrade`")
        return Check(True, f"schema {current}")

    async def _write_queue(self) -> Check:
        depth, size = len(self._writes), self._settings.write_queue_size
        return Check(depth < SATURATED * size, f"{depth} of {size} queued")

    async def _model(self, alias: str) -> Check:
        cached = self._cache.get(alias)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        probing = self._probing.get(alias)
        if probing is None:  # single flight: callers arriving meanwhile share this probe
            probing = self._probing[alias] = asyncio.ensure_future(self._probe(alias))
            probing.add_done_callback(lambda _: self._probing.pop(alias, None))
        return await asyncio.shield(probing)

    async def _probe(self, alias: str) -> Check:
        config = self._settings.models[alias]
        if config.provider == "local":
            result = await self._local(alias)
        else:
            result = await self._deployments(alias, config)
        self._cache[alias] = (result, time.monotonic() + self._settings.readiness_cache_seconds)
        return result

    async def _deployments(self, alias: str, config: ModelConfig) -> Check:
        """Each deployment with its own URL and key; the alias can serve while one of them answers."""
        deployments = config.deployment_configs(alias)
        checks = await asyncio.gather(*(self._remote(resolved) for _, _, resolved in deployments))
        if len(checks) == 1:
            return checks[0]
        detail = "; ".join(
            f"{name}: {check.detail}" for (name, _, _), check in zip(deployments, checks, strict=True)
        )
        return Check(any(check.ok for check in checks), detail)

    async def _local(self, alias: str) -> Check:
        for model in self._models.providers(alias):
            if getattr(model, "loaded", True) is False:
                reason = getattr(model, "unavailable_reason", "unknown")
                return Check(False, f"local model not loaded: {reason}")
        return Check(True, "loaded")

    async def _remote(self, config: ModelConfig) -> Check:
        headers = dict(config.headers)
        key = config.resolved_api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
            headers["x-api-key"] = key
            headers["anthropic-version"] = "2023-06-01"
        base = config.upstream_base_url()
        url = f"{base}/models" if config.provider == "openai" else f"{base}/v1/models"
        try:
            response = await self._client.request(
                "GET",
                url,
                headers=headers,
                total=5,
                connect_timeout=config.connect_timeout,
                ca_bundle=str(config.ca_bundle) if config.ca_bundle else None,  # as the provider calls it
            )
            status = response.status
            response.close()  # only the status matters; the body is not worth a pooled connection
        except (HTTPError, TimeoutError) as exc:
            return Check(False, f"unreachable: {type(exc).__name__}")
        if status in (401, 403):
            return Check(False, f"answered {status}: check the API key")
        if status >= 500:
            return Check(False, f"answered {status}")
        return Check(True, f"answered {status}")
