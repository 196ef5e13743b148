"""`create_app(settings)`: the one composition root. Every component is built once, in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fastapi import FastAPI
from prometheus_client import start_http_server
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from keel import __version__
from keel.context import ConversationCatalog
from keel.context.setup import start_context
from keel.costs.setup import start_costs
from keel.db import Database, WriteQueue
from keel.gateway import Components, GatewayMiddleware
from keel.gateway import errors as error_handlers
from keel.gateway.audit_routes import router as audit_router
from keel.gateway.auth import Authenticator
from keel.gateway.chat.openapi import install_openapi
from keel.gateway.chat.router import chat_route
from keel.gateway.chat.service import ChatService
from keel.gateway.conversations_routes import router as conversations_router
from keel.gateway.costs_routes import router as costs_router
from keel.gateway.prompts_routes import router as prompts_router
from keel.gateway.routes import metrics as metrics_route
from keel.gateway.routes import router as small_routes
from keel.llm import ModelRegistry
from keel.llm.http import HttpClient
from keel.pipeline import ChatPipeline, ConversationRecorder
from keel.process_guard import exit_with_parent
from keel.prompts import PromptRuntime
from keel.ratelimit import InMemoryRateLimiter, RateLimiter, RedisRateLimiter
from keel.settings import Settings
from keel.telemetry.audit import AuditRecorder
from keel.telemetry.audit_store import AuditStore
from keel.telemetry.metrics import Metrics
from keel.telemetry.readiness import Readiness
from keel.telemetry.redact import Redactor
from keel.telemetry.replay import Replayer
from keel.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from redis.asyncio import Redis
from keel.tenants import TenantService

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> GatewayMiddleware:
    """The ASGI app: the gateway middleware (request ids, body limit, access log, metrics, the request
    span) around the hot chat route and the FastAPI app that serves every other route and the lifespan."""
    telemetry = Telemetry(settings)
    app = FastAPI(
        title="Keel",
        version=__version__,
        lifespan=lambda app: _lifespan(app, settings, telemetry),
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry reads the global providers; Keel has its own (keel.telemetry).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    error_handlers.install(app)
    cors = _cors(settings)
    chat = chat_route(app, [Middleware(CORSMiddleware, **cors)] if cors else [])
    app.router.routes.append(chat)  # served by GatewayMiddleware as a hot route; here for its 405
    install_openapi(app)  # FastAPI cannot see the hot route: /openapi.json gets it from here
    app.include_router(small_routes)
    app.include_router(conversations_router)
    app.include_router(audit_router)
    app.include_router(prompts_router)
    app.include_router(costs_router)
    if settings.metrics_enabled and settings.metrics_port is None:
        app.add_api_route("/metrics", metrics_route, methods=["GET"], include_in_schema=False)
    if cors:
        app.add_middleware(CORSMiddleware, **cors)
    return GatewayMiddleware(
        app,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_read_timeout_seconds,
        tracer=telemetry.tracing.tracer,
        metrics=telemetry.metrics,
        hot_routes=[chat],
    )


def _cors(settings: Settings) -> dict[str, Any] | None:
    if not settings.cors_origins:
        return None
    return {
        "allow_origins": settings.cors_origins,
        "allow_methods": ["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        "allow_headers": ["*"],
        "expose_headers": [
            "x-request-id",
            "x-client-request-id",
            "x-keel-conversation-id",
            "retry-after",
            "x-keel-model",
            "x-keel-attempts",
            "x-keel-fallback",
            "x-keel-cost-usd",
        ],
    }


class Telemetry:
    """Metrics and tracing exist before the lifespan: the middleware is built with them."""

    def __init__(self, settings: Settings) -> None:
        self.metrics = Metrics()
        self.tracing = Tracing(settings)


@asynccontextmanager
async def _lifespan(app: FastAPI, settings: Settings, telemetry: Telemetry) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        components = await build_components(settings, stack, telemetry, serving=True)
        app.state.keel = components
        if settings.metrics_enabled and settings.metrics_port is not None:
            server, _thread = start_http_server(
                settings.metrics_port, addr=settings.host, registry=telemetry.metrics.registry
            )
            stack.callback(server.server_close)  # runs after shutdown (LIFO): no leaked socket
            stack.callback(server.shutdown)
        log.info("keel ready", extra={"models": sorted(settings.models)})
        yield
        log.info("keel shutting down")


async def build_components(
    settings: Settings, stack: AsyncExitStack, telemetry: Telemetry, *, serving: bool = False
) -> Components:
    """Everything a request needs, built once; what is opened here is closed by `stack`, last first.

    `keel serve` and the CLI commands that run model calls (`keel replay`) share this.
    """
    stack.callback(telemetry.tracing.shutdown)
    database = Database(settings)
    stack.push_async_callback(database.close)
    engine = await database.open()

    tenants = TenantService(engine, settings)
    if serving:
        admin_key = await tenants.bootstrap()
        if admin_key is not None:
            announce_admin_key(settings, admin_key)

    prepare: ProcessPoolExecutor | None = None
    if serving:  # audit redaction in a process of its own: a thread would hold the GIL (db/writer.py)
        prepare = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent
        )
        stack.callback(prepare.shutdown, cancel_futures=True)  # after the queue has drained (LIFO)
        prepare.submit(int)  # start its process now, not on the first audit record
    writes = WriteQueue(
        engine,
        max_size=settings.write_queue_size,
        batch_size=settings.write_batch_size,
        linger=settings.write_linger_seconds,
        executor=prepare,
    )
    writes.start()
    stack.push_async_callback(writes.close, settings.shutdown_drain_seconds)
    telemetry.metrics.queue_depth.set_function(lambda: len(writes))

    client = HttpClient(settings.upstream)  # every upstream call: model providers and readiness probes
    stack.push_async_callback(client.aclose)

    redis = _redis(settings, stack)  # one client, shared by the rate limiter and the circuit breakers
    models = ModelRegistry(settings, client, redis=redis, observer=telemetry.metrics)
    stack.push_async_callback(models.aclose)
    await models.start()

    limiter = await _rate_limiter(settings, stack, redis)
    tracer = telemetry.tracing.tracer
    authenticator = Authenticator(
        tenants,
        ttl=settings.auth_cache_ttl_seconds,
        flush_every=settings.key_usage_flush_seconds,
        tracer=tracer,
        cache_size=settings.auth_cache_size,
        failures_per_minute=settings.auth_failures_per_minute,
    )
    authenticator.start()
    stack.push_async_callback(authenticator.aclose)

    costs = await start_costs(settings, stack, engine, writes, client, telemetry.metrics, serving=serving)
    context = await start_context(settings, stack, engine, writes, serving=serving)
    conversations = context.conversations
    audit = AuditRecorder(
        writes,
        telemetry.metrics,
        Redactor(settings.redact_patterns, max_chars=settings.redact_max_chars),
        enabled=settings.audit_enabled,
        hash_end_user=settings.audit_end_user == "hash",
    )
    prompts = PromptRuntime(settings, engine, database.url, redis)
    if serving:  # listener and canary guard; elsewhere the resolver reads the database directly
        await prompts.start()
        stack.push_async_callback(prompts.aclose)
    pipeline = ChatPipeline(
        models,
        context.manager,
        prompts=prompts.resolver,
        recorders=[
            ConversationRecorder(context.manager),
            audit,
            context.factors,
            *([costs.recorder] if costs else []),
        ],
        tracer=tracer,
        trace_content=settings.trace_content,
        observer=telemetry.metrics,
        output_caps={
            alias: config.max_output_tokens
            for alias, config in settings.models.items()
            if config.max_output_tokens is not None
        },
    )
    context.bind(
        lambda tenant_id, conversation_id, messages, prompt, alias, request_id: pipeline.summary(
            tenant_id,
            conversation_id,
            messages,
            prompt,
            alias,
            request_id,
            settings.context.summary_max_tokens,
        )
    )
    store = AuditStore(engine)
    if serving:
        pruner = asyncio.create_task(_prune_forever(store, settings.audit_retention_days))
        stack.callback(pruner.cancel)
    return Components(
        authenticator=authenticator,
        chat=ChatService(
            pipeline,
            limiter,
            settings,
            tracer=tracer,
            metrics=telemetry.metrics,
            costs=costs.tracker if costs else None,
        ),
        models=models,
        conversations=conversations,
        catalog=ConversationCatalog(engine, writes),
        tenants=tenants,
        audit=store,
        replayer=Replayer(store, pipeline),
        readiness=Readiness(settings, engine, writes, models, client),
        metrics=telemetry.metrics,
        writes=writes,
        prompts=prompts.registry,
        feedback=prompts.feedback,
        limiter=limiter,  # every other route takes one request from it (gateway.deps)
        tiers=settings.tiers,
        costs=costs.tracker if costs else None,
        reports=costs.reports if costs else None,
    )


async def _prune_forever(store: AuditStore, days: int) -> None:
    """Retention: hourly, delete audit records older than `audit_retention_days`."""
    while True:
        try:
            removed = await store.prune(days)
            if removed:
                log.info("audit retention: removed %d records older than %d days", removed, days)
        except Exception:  # the database may be away for a while; try again next hour
            log.warning("audit retention prune failed", exc_info=True)
        await asyncio.sleep(3600)


def _redis(settings: Settings, stack: AsyncExitStack) -> Redis | None:
    if settings.redis_url is None:
        return None
    from redis.asyncio import Redis

    client = Redis.from_url(settings.redis_url.get_secret_value())
    stack.push_async_callback(client.aclose)
    return client


async def _rate_limiter(settings: Settings, stack: AsyncExitStack, redis: Redis | None) -> RateLimiter | None:
    if not settings.rate_limits_enabled:
        return None
    limiter: RateLimiter = RedisRateLimiter(redis) if redis is not None else InMemoryRateLimiter()
    stack.push_async_callback(limiter.aclose)
    return limiter


def announce_admin_key(settings: Settings, key: str, stream: TextIO | None = None) -> Path:
    """First start: keep the admin key in DATA_DIR/admin.key (mode 0600 before a byte is written), and
    show it once only when `stream` (default stderr) is a terminal: piped to a log collector, it would
    stay in the logs, so then only the file's path is printed."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "admin.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(fd, 0o600)  # a file that already existed keeps its mode through O_CREAT
        handle.write(key + "\n")
    out = stream if stream is not None else sys.stderr
    shown = f":\n\n    {key}\n" if out.isatty() else " (not shown: the output is not a terminal)."
    print(f"\nKeel created tenant 'default' and its admin key, saved in {path}{shown}", file=out, flush=True)
    return path
