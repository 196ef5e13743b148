"""The chat completion service: rate limits around the pipeline. No FastAPI in here."""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

from opentelemetry.trace import NoOpTracer, Tracer

from keel.errors import InvalidRequestError, RateLimitError
from keel.gateway.chat.protocol import ChatCompletionRequest
from keel.llm import CallTrace, ChatEvent, ChatRequest, Usage
from keel.pipeline import ChatCall, ChatPipeline
from keel.prompts.reference import prompt_reference
from keel.ratelimit import Lease, RateLimiter
from keel.settings import Settings
from keel.telemetry.metrics import Metrics
from keel.telemetry.tracing import stage
from keel.tenants import Principal

_SANE_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
CHARS_PER_TOKEN = 4  # a cheap pre-call estimate; the real usage corrects the TPM bucket afterwards


class OpenedChat:
    """A started chat: iterate it for its events (the first included); then `finish()` or `aclose()`.

    `finish()`, after the answer went out: lets the pipeline run past its last event (its record stage),
    then closes. Off the critical path: the client already has its answer while Keel records it.
    `aclose()` closes the pipeline and settles and releases the rate-limit lease, exactly once; the router
    calls it however the response ends, so a client that leaves early still frees its concurrency slot.
    """

    def __init__(
        self,
        first: ChatEvent,
        rest: AsyncGenerator[ChatEvent, None],
        lease: Lease | None,
        headers: dict[str, str],
        model: str,
        conversation_id: str | None,
    ) -> None:
        self._first: ChatEvent | None = first
        self._rest = rest
        self._lease = lease
        self._used = 0
        self._closed = False
        self.headers = headers
        self.model = model
        self.conversation_id = conversation_id

    def __aiter__(self) -> OpenedChat:
        return self

    async def __anext__(self) -> ChatEvent:
        # A plain iterator rather than an async generator: one layer less per event.
        event = self._first
        if event is None:
            event = await anext(self._rest)
        else:
            self._first = None
        if isinstance(event, Usage):
            self._used = event.input_tokens + event.output_tokens
        return event

    async def finish(self) -> None:
        try:
            async for _ in self:
                pass  # nothing comes after Finish; this runs the pipeline's record stage
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._rest.aclose()
        if self._lease is not None:
            await self._lease.settle(self._used)
            await self._lease.release()


class ChatService:
    def __init__(
        self,
        pipeline: ChatPipeline,
        limiter: RateLimiter | None,
        settings: Settings,
        *,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._limiter = limiter
        self._tracer = tracer or NoOpTracer()
        self._metrics = metrics
        self._tiers = settings.tiers
        self._default_model = settings.default_model
        self._model_configs = settings.models
        self._default_completion = settings.default_completion_tokens_estimate

    async def open(
        self,
        principal: Principal,
        body: ChatCompletionRequest,
        request_id: str,
        conversation_id: str | None,
        received: float = 0.0,
        *,
        timeout_header: str | None = None,
        prompt_header: str | None = None,
    ) -> OpenedChat:
        """Everything up to the model's first event, so failures there still get a proper HTTP status."""
        request = to_chat_request(body, self._default_model)
        conversation_id = body.conversation_id or conversation_id
        if conversation_id is not None and not _SANE_CONVERSATION_ID.match(conversation_id):
            raise InvalidRequestError(
                "conversation_id must be 1-128 characters of letters, digits and . _ : -",
                param="conversation_id",
            )
        prompt = prompt_reference(body.prompt.model_dump() if body.prompt else None, prompt_header)
        request.trace.deadline = self._deadline(request.model, timeout_header)
        lease = None
        headers: dict[str, str] = {}
        if self._limiter is not None:
            estimate = estimate_tokens(request, self._default_completion)
            with stage(self._tracer, "rate_limit"):
                try:
                    lease = await self._limiter.acquire(
                        str(principal.tenant_id), self._tiers[principal.tier], estimate
                    )
                except RateLimitError as exc:
                    if self._metrics is not None:
                        for kind in _limit_kinds(exc):
                            self._metrics.rate_limited.labels(principal.tier, kind).inc()
                    raise
            headers = lease.state.headers()
        call = ChatCall(
            request_id,
            principal.tenant_id,
            request,
            conversation_id,
            prompt=prompt,
            received=received,
            audit_content=principal.audit_content,
            model_named=body.model is not None,
        )
        events = self._pipeline.stream(call)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            if lease is not None:
                await lease.settle(0)
                await lease.release()
            raise
        answered = request.trace.answered_by or request.model
        headers |= model_headers(request.trace, answered)
        return OpenedChat(first, events, lease, headers, answered, conversation_id)

    def _deadline(self, alias: str, header: str | None) -> float | None:
        """time.monotonic() by which the model call must end: the alias's total timeout, or the client's
        `X-Keel-Timeout` when shorter."""
        config = self._model_configs.get(alias)
        seconds = config.timeout if config is not None else None
        if header is not None:
            asked = parse_timeout(header)
            seconds = asked if seconds is None else min(seconds, asked)
        return None if seconds is None else time.monotonic() + seconds


def parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequestError(
            f"X-Keel-Timeout must be a positive number of seconds, not {value[:40]!r}.",
            code="invalid_timeout",
        )
    return seconds


def model_headers(trace: CallTrace, answered: str) -> dict[str, str]:
    """Which model answered and how: known when the first event arrives, which is when headers go."""
    headers = {"x-keel-model": answered, "x-keel-attempts": str(max(1, len(trace.attempts)))}
    if trace.fallback:
        headers["x-keel-fallback"] = "1"
    return headers


def _limit_kinds(error: RateLimitError) -> list[str]:
    if error.code == "request_too_large":
        return ["tokens"]
    kinds = [
        kind
        for kind, words in (
            ("requests", "requests per minute"),
            ("tokens", "tokens per minute"),
            ("concurrency", "concurrent requests"),
        )
        if words in error.message
    ]
    return kinds or ["other"]


def to_chat_request(body: ChatCompletionRequest, default_model: str) -> ChatRequest:
    if body.n not in (None, 1):
        raise InvalidRequestError("Only n=1 is supported.", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise InvalidRequestError("At most 4 stop sequences are allowed.", param="stop")
    tools: list[dict[str, Any]] | None = None
    if body.tools:
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    return ChatRequest(
        model=body.model or default_model,
        messages=[m.model_dump(exclude_none=True) for m in body.messages],
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
        user=body.user,
        tools=tools,
        tool_choice=body.tool_choice,
    )


def estimate_tokens(request: ChatRequest, default_completion: int) -> int:
    chars = 0
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part.get("text", "")) for part in content)
    return chars // CHARS_PER_TOKEN + 4 * len(request.messages) + (request.max_tokens or default_completion)
