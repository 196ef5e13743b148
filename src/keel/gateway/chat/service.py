"""The chat completion service: rate limits around the pipeline. No FastAPI in here.

A request meets the limiter twice: `admit` takes a request and a concurrency slot before its body is
read (a refused client costs no parsing), `open` reserves the token estimate of the parsed request (the
whole prompt, tools and the completion cap). When the call ends, the lease is settled with the usage the
pipeline reports (or estimates, when none arrived) and always released.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from opentelemetry.trace import NoOpTracer, Tracer

from keel.costs import Cost, CostTracker, Spend
from keel.errors import InvalidRequestError, OverloadedError, RateLimitError
from keel.gateway.chat.protocol import ChatCompletionRequest
from keel.llm import CallTrace, ChatEvent, ChatRequest, ChatResult, Usage
from keel.pipeline import ChatCall, ChatPipeline, FileSearch
from keel.prompts.reference import prompt_reference
from keel.ratelimit import Lease, RateLimiter, prompt_tokens
from keel.settings import Settings
from keel.telemetry.metrics import Metrics
from keel.telemetry.tracing import stage
from keel.tenants import Principal

log = logging.getLogger(__name__)

_SANE_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class OpenedChat:
    """A started chat: iterate it for its events (the first included); then `finish()` or `aclose()`.

    `finish()`, after the answer went out: lets the pipeline run past its last event (its record stage),
    then closes. Off the critical path: the client already has its answer while Keel records it.
    `aclose()` closes the pipeline, then settles the rate-limit lease with what the call used and releases
    it, exactly once; the router calls it however the response ends, so a client that leaves early is
    charged for what it was streamed and still frees its concurrency slot.
    """

    def __init__(
        self,
        first: ChatEvent,
        rest: AsyncGenerator[ChatEvent, None],
        lease: Lease | None,
        call: ChatCall,
        headers: dict[str, str],
        model: str,
        conversation_id: str | None,
        spend: Spend | None = None,
        commit: Callable[[ChatCall], Awaitable[None]] | None = None,
    ) -> None:
        self._first: ChatEvent | None = first
        self._commit = commit
        self._rest = rest
        self._lease = lease
        self._call = call
        self._spend = spend
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
            return await anext(self._rest)
        self._first = None
        return event

    def sources(self) -> list[dict[str, Any]] | None:
        """The retrieved chunks the context held, as the answer's `sources` (None: no file_search)."""
        if self._call.file_search is None:
            return None
        return [chunk.source_json(i + 1) for i, chunk in enumerate(self._call.sources)]

    def cost(self, usage: Usage | None) -> Cost | None:
        """What the answer cost (X-Keel-Cost-USD, the `cost` field); None without usage or cost tracking."""
        if self._spend is None:
            return None
        trace = self._call.request.trace
        return self._spend.cost_of(self.model, trace.upstream_model, usage)

    async def commit_turn(self) -> None:
        """A conversation turn's reply, committed before the answer's last byte (nothing acknowledged is
        lost, and the next turn sees it on any replica)."""
        if self._commit is None or self._call.conversation_id is None:
            return
        try:
            await self._commit(self._call)
        except Exception as exc:  # the answer is not acknowledged: the client hears it failed
            log.exception("conversation %s: the reply could not be stored", self._call.conversation_id)
            raise OverloadedError(
                "The answer could not be stored in its conversation; try the turn again.",
                code="conversation_write_failed",
            ) from exc

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
        try:
            await self._rest.aclose()  # runs the pipeline's record stage, which fills call.usage
        finally:
            try:
                if self._lease is not None:
                    await self._lease.end(used_tokens(self._call))
            finally:
                if self._spend is not None:  # the ledger recorder has told it the cost
                    await self._spend.settle()


class ChatService:
    def __init__(
        self,
        pipeline: ChatPipeline,
        limiter: RateLimiter | None,
        settings: Settings,
        *,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
        costs: CostTracker | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._limiter = limiter
        self._costs = costs
        self._tracer = tracer or NoOpTracer()
        self._metrics = metrics
        self._tiers = settings.tiers
        self._default_model = settings.default_model
        self._model_configs = settings.models
        self._default_completion = settings.default_completion_tokens_estimate

    async def admit(self, principal: Principal) -> Lease | None:
        """A request and a concurrency slot, before the request's body is read (refused: 429). The caller
        releases the lease in a `finally`; None when rate limits are off."""
        if self._limiter is None:
            return None
        with stage(self._tracer, "rate_limit"):
            try:
                return await self._limiter.acquire(str(principal.tenant_id), self._tiers[principal.tier], 0)
            except RateLimitError as exc:
                self._refused(principal, exc)
                raise

    async def open(
        self,
        principal: Principal,
        body: ChatCompletionRequest,
        lease: Lease | None,
        request_id: str,
        conversation_id: str | None,
        received: float = 0.0,
        *,
        timeout_header: str | None = None,
        prompt_header: str | None = None,
        client_request_id: str | None = None,
    ) -> OpenedChat:
        """Everything up to the model's first event, so failures there still get a proper HTTP status.

        `lease`: from `admit`; its token estimate is reserved here, and it is settled and released when
        the returned chat closes (or here, when the call fails before its first event)."""
        request = to_chat_request(body, self._default_model)
        request = self._pipeline.cap_output(request)  # max_tokens over the alias's cap: before the estimate
        if body.model is not None:  # refused before any token is reserved; a prompt's choice: in the pipeline
            principal.require_model(request.model)
        conversation_id = body.conversation_id or conversation_id
        if conversation_id is not None and not _SANE_CONVERSATION_ID.match(conversation_id):
            raise InvalidRequestError(
                "conversation_id must be 1-128 characters of letters, digits and . _ : -",
                param="conversation_id",
            )
        prompt = prompt_reference(body.prompt.model_dump() if body.prompt else None, prompt_header)
        request.trace.deadline = self._deadline(request.model, timeout_header)
        headers: dict[str, str] = {}
        spend = await self._spend(principal, request, request_id)  # budgets: refused before any upstream
        if lease is not None:
            try:
                await self._reserve(principal, lease, request)
            except BaseException:
                if spend is not None:
                    await spend.settle()  # frees its budget reservation
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
            client_request_id=client_request_id,
            check_model=principal.require_model,
            context_strategy=body.context.strategy if body.context is not None else None,
            file_search=FileSearch.parse(body.file_search.model_dump()) if body.file_search else None,
        )
        events = self._pipeline.stream(call)
        try:
            first = await anext(events)
        except BaseException:
            try:
                await events.aclose()
            finally:
                try:
                    if lease is not None:  # the pipeline charged what the upstream had (a timeout), or 0
                        await lease.end(used_tokens(call))
                finally:
                    if spend is not None:
                        await spend.settle()
            raise
        answered = request.trace.answered_by or request.model
        headers |= model_headers(request.trace, answered)
        if call.context is not None:  # a conversation turn: what of its history was sent
            headers |= call.context.headers()
        return OpenedChat(
            first, events, lease, call, headers, answered, conversation_id, spend, self._pipeline.commit_turn
        )

    async def collect(self, principal: Principal, call: ChatCall, lease: Lease | None) -> ChatResult:
        """A call built elsewhere (a replay), under the same limits as a chat completion: `lease` from
        `admit`, its estimate reserved here; settled with what the call used and released at the end."""
        spend: Spend | None = None
        try:
            spend = await self._spend(principal, call.request, call.request_id)
            if lease is not None:
                await self._reserve(principal, lease, call.request)
            result = ChatResult()
            events = self._pipeline.stream(call)
            try:
                async for event in events:
                    result.add(event)
            finally:
                await events.aclose()
            return result
        finally:
            try:
                if lease is not None:
                    await lease.end(used_tokens(call))
            finally:
                if spend is not None:
                    await spend.settle()

    async def _spend(self, principal: Principal, request: ChatRequest, request_id: str) -> Spend | None:
        """The request's cost tracking; with budgets, its estimate reserved (or a 429 insufficient_quota)."""
        if self._costs is None:
            return None
        if not self._costs.has_budgets(principal.tenant_id):
            return await self._costs.open(principal, request, request_id)  # no I/O
        with stage(self._tracer, "budget"):
            return await self._costs.open(principal, request, request_id)

    async def _reserve(self, principal: Principal, lease: Lease, request: ChatRequest) -> None:
        with stage(self._tracer, "rate_limit.tokens"):
            try:
                await lease.reserve(self.estimate(request))
            except RateLimitError as exc:
                self._refused(principal, exc)
                raise

    def estimate(self, request: ChatRequest) -> int:
        """The tokens reserved before the call: the whole prompt (messages, tool calls, tool definitions)
        and the most the reply may take (`max_tokens` within the alias's `max_output_tokens`, else that,
        else the default guess).
        The real usage (history and a registry prompt included) corrects it when the call ends."""
        config = self._model_configs.get(request.model)
        cap = config.max_output_tokens if config is not None else None
        completion = request.max_tokens
        if completion is None:
            completion = cap or self._default_completion
        elif cap is not None:
            completion = min(completion, cap)  # the pipeline lowers max_tokens to the alias's cap
        return prompt_tokens(request) + completion

    def _refused(self, principal: Principal, exc: RateLimitError) -> None:
        if self._metrics is not None:
            for kind in _limit_kinds(exc):
                self._metrics.rate_limited.labels(principal.tier, kind).inc()

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


def used_tokens(call: ChatCall) -> int:
    """What to settle a lease with: the usage the pipeline reported or estimated; 0 when the call never
    reached the model."""
    usage = call.usage
    return usage.input_tokens + usage.output_tokens if usage is not None else 0
