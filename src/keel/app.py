"""`create_app(settings)`: the one composition root. Every component is built once, in the lifespan."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from keel import __version__
from keel.context import ConversationStore
from keel.db import Database, WriteQueue
from keel.gateway import Components, GatewayMiddleware
from keel.gateway import errors as error_handlers
from keel.gateway.auth import Authenticator
from keel.gateway.chat.router import router as chat_router
from keel.gateway.chat.service import ChatService
from keel.gateway.routes import router as small_routes
from keel.llm import ModelRegistry
from keel.pipeline import ChatPipeline
from keel.ratelimit import InMemoryRateLimiter, RateLimiter, RedisRateLimiter
from keel.settings import Settings
from keel.tenants import TenantService

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="Keel",
        version=__version__,
        lifespan=lambda app: _lifespan(app, settings),
        docs_url=None,
        redoc_url=None,
    )
    error_handlers.install(app)
    app.include_router(chat_router)
    app.include_router(small_routes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "x-keel-conversation-id", "retry-after"],
        )
    app.add_middleware(GatewayMiddleware, max_body_bytes=settings.max_body_bytes)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        database = Database(settings)
        stack.push_async_callback(database.close)
        engine = await database.open()

        tenants = TenantService(engine)
        admin_key = await tenants.bootstrap()
        if admin_key is not None:
            announce_admin_key(settings, admin_key)

        writes = WriteQueue(engine, max_size=settings.write_queue_size, batch_size=settings.write_batch_size)
        writes.start()
        stack.push_async_callback(writes.close, settings.shutdown_drain_seconds)

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )
        stack.push_async_callback(session.close)

        models = ModelRegistry(settings, session)
        stack.push_async_callback(models.aclose)
        await models.start()

        limiter = await _rate_limiter(settings, stack)
        authenticator = Authenticator(
            tenants, ttl=settings.auth_cache_ttl_seconds, flush_every=settings.key_usage_flush_seconds
        )
        authenticator.start()
        stack.push_async_callback(authenticator.aclose)

        conversations = ConversationStore(engine, writes)
        stack.push_async_callback(conversations.drain)  # runs before writes.close (LIFO)
        pipeline = ChatPipeline(models, conversations)
        app.state.keel = Components(
            authenticator=authenticator,
            chat=ChatService(pipeline, limiter, settings),
            models=models,
            conversations=conversations,
            tenants=tenants,
        )
        app.state.database = database
        app.state.writes = writes
        log.info("keel ready", extra={"models": sorted(settings.models), "embedded_db": database.embedded})
        yield
        log.info("keel shutting down: draining %d queued writes", len(writes))


async def _rate_limiter(settings: Settings, stack: AsyncExitStack) -> RateLimiter | None:
    if not settings.rate_limits_enabled:
        return None
    limiter: RateLimiter
    if settings.redis_url is not None:
        from redis.asyncio import Redis

        client = Redis.from_url(settings.redis_url.get_secret_value())
        stack.push_async_callback(client.aclose)
        limiter = RedisRateLimiter(client)
    else:
        limiter = InMemoryRateLimiter()
    stack.push_async_callback(limiter.aclose)
    return limiter


def announce_admin_key(settings: Settings, key: str) -> Path:
    """First start: print the admin key once and keep it in DATA_DIR/admin.key (mode 0600)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "admin.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)
    print(
        f"\nKeel created tenant 'default' and its admin key (also saved in {path}):\n\n    {key}\n",
        file=sys.stderr,
        flush=True,
    )
    return path
