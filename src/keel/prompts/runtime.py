"""The prompt registry's parts in one serving process, built once by the composition root."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from keel.prompts.cache import PromptCache
from keel.prompts.canary import CanaryGuard
from keel.prompts.changes import Publishers
from keel.prompts.feedback import FeedbackStore
from keel.prompts.gate import PromotionGate
from keel.prompts.invalidation import PostgresListener, RedisListener, RedisPublisher
from keel.prompts.registry import PromptRegistry
from keel.prompts.resolver import RegistryResolver
from keel.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

CONNECT_WAIT_SECONDS = 5.0


class PromptRuntime:
    """Registry (admin operations), resolver (the pipeline stage), its cache and listener, the canary
    guard and the feedback store. With Redis configured, changes are published and heard there."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        database_url: str,
        redis: Redis | None = None,
        *,
        gate: PromotionGate | None = None,
    ) -> None:
        config = settings.prompts
        self.cache = PromptCache()
        publisher = Publishers(self.cache, RedisPublisher(redis)) if redis is not None else self.cache
        self.registry = PromptRegistry(engine, gate=gate, publisher=publisher)
        self.guard = CanaryGuard(engine, self.registry.experiments, config)
        self.resolver = RegistryResolver(
            self.registry.store, self.cache, max_rendered_chars=config.max_rendered_chars, canaries=self.guard
        )
        self.feedback = FeedbackStore(engine, wait_seconds=config.feedback_wait_seconds)
        self.listener: PostgresListener | RedisListener
        if settings.redis_url is not None:
            self.listener = RedisListener(settings.redis_url.get_secret_value(), self.cache)
        else:
            self.listener = PostgresListener(database_url, self.cache)

    async def start(self) -> None:
        """Listen for changes (the cache stays off until the listener is in) and guard canaries."""
        self.listener.start()
        self.guard.start()
        try:
            await asyncio.wait_for(self.listener.connected.wait(), CONNECT_WAIT_SECONDS)
        except TimeoutError:
            log.warning("prompt change listener not connected yet: prompts are read from the database")

    async def aclose(self) -> None:
        await self.guard.aclose()
        await self.listener.aclose()
