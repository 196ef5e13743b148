"""POST /v1/chat/completions: validate, call the service, answer JSON or SSE.

A plain ASGI app on a Starlette `Route`, not a FastAPI endpoint: this is the hot path, and FastAPI's
request wrapping, dependency resolution and response classes cost more than everything Keel itself does
for a request (docs/performance.md). What FastAPI would do here is done by hand: the API key is checked
like `deps.principal`, errors answer through `errors.response_for` like the installed handlers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from keel.errors import ClientDisconnectedError, InvalidRequestError, KeelError
from keel.gateway.chat.protocol import ChatCompletionRequest, ChunkWriter, completion_json
from keel.gateway.chat.service import OpenedChat
from keel.gateway.deps import Components
from keel.gateway.disconnect import watch_disconnect
from keel.gateway.errors import response_for
from keel.gateway.middleware import random_hex
from keel.llm import ChatResult, Finish, TextDelta, ToolCallDelta, Usage
from keel.telemetry import tenant_var

log = logging.getLogger(__name__)

CONVERSATION_HEADER = "x-keel-conversation-id"
TIMEOUT_HEADER = "x-keel-timeout"  # seconds: shortens the model alias's total deadline
PROMPT_HEADER = "x-keel-prompt"  # NAME, NAME@LABEL or NAME@VERSION of a registry prompt

# The request headers this route reads, by their raw (lowercase) ASGI names.
_READ = {
    b"authorization": "authorization",
    b"x-api-key": "x-api-key",
    b"x-keel-conversation-id": CONVERSATION_HEADER,
    b"x-keel-timeout": TIMEOUT_HEADER,
    b"x-keel-prompt": PROMPT_HEADER,
}
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


class ChatCompletions:
    def __init__(self, app: Starlette) -> None:
        self._app = app  # its state holds the components once the lifespan has built them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        started = _Started(send)
        try:
            await self._serve(scope, receive, started)
        except Exception as exc:
            if not started.response:
                await response_for(exc, request_id)(scope, receive, send)
            elif not isinstance(exc, ClientDisconnectedError):  # mid-stream: nobody is left to tell
                log.exception("chat completion failed after its response started")

    async def _serve(self, scope: Scope, receive: Receive, send: _Started) -> None:
        keel: Components = self._app.state.keel
        state = scope["state"]
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            wanted = _READ.get(name)
            if wanted is not None:
                headers[wanted] = value.decode("latin-1")
        client = scope.get("client")
        principal = await keel.authenticator.authenticate(
            headers.get("authorization"), headers.get("x-api-key"), client[0] if client else None
        )
        tenant_var.set(principal.tenant)
        # Requests per minute and a concurrency slot before the body is read: a refused client costs no
        # read and no parse. Tokens per minute once the body says how many.
        lease = await keel.chat.admit(principal)
        try:
            body = parse_body(await read_body(receive))
            # The client leaving cancels retries, backoff and the upstream call at once.
            async with watch_disconnect(receive) as watch:
                opened = await keel.chat.open(
                    principal,
                    body,
                    lease,
                    state["request_id"],
                    headers.get(CONVERSATION_HEADER),
                    state["received"],
                    timeout_header=headers.get(TIMEOUT_HEADER),
                    prompt_header=headers.get(PROMPT_HEADER),
                    client_request_id=state.get("client_request_id"),
                )
                try:
                    await self._answer(opened, body, send, watch)
                    await opened.finish()  # after the answer went out: record, settle the lease
                finally:
                    await opened.aclose()
        finally:
            if lease is not None:  # already released, unless the request failed before it was opened
                await lease.release()

    async def _answer(
        self, opened: OpenedChat, body: ChatCompletionRequest, send: _Started, watch: watch_disconnect
    ) -> None:
        headers = opened.headers
        if opened.conversation_id is not None:
            headers[CONVERSATION_HEADER] = opened.conversation_id
        raw_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        completion_id = f"chatcmpl-{random_hex()}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            writer = ChunkWriter(completion_id, created, opened.model, include_usage)
            await send({"type": "http.response.start", "status": 200, "headers": _SSE + raw_headers})
            last = await stream(opened, writer, send)
            try:
                await opened.commit_turn()  # a conversation's reply is stored before [DONE]
            except KeelError as exc:
                last = _event(exc.envelope())
            watch.stop()  # a finished response reads as a disconnect
            await send({"type": "http.response.body", "body": last})
            return
        result = ChatResult()
        async for event in opened:
            result.add(event)
            if isinstance(event, Finish):
                break  # the answer is complete: send it before the pipeline records it
        await opened.commit_turn()  # a conversation's reply is stored before the body goes out
        watch.stop()
        answer = completion_json(completion_id, created, opened.model, result)
        sources = opened.sources()
        if sources is not None:
            answer["sources"] = sources
        cost = opened.cost(result.usage)
        if cost is not None:  # what the call cost, beside its usage (keel.costs)
            answer["cost"] = cost.usd
            raw_headers.append((b"x-keel-cost-usd", f"{cost.usd:.6f}".encode()))
        payload = orjson.dumps(answer)
        raw_headers += [_JSON, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})


class _Started:
    """`send` that remembers whether the response has started (then errors can only go in-band)."""

    __slots__ = ("_send", "response")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.response = False

    async def __call__(self, message: Message) -> None:
        self.response = True
        await self._send(message)


def chat_route(app: Starlette, middleware: Sequence[Middleware] = ()) -> Route:
    """The route, with the app's CORS middleware when it has one (hot routes skip the app's stack)."""
    return Route("/v1/chat/completions", ChatCompletions(app), methods=["POST"], middleware=middleware)


async def read_body(receive: Receive) -> bytes:
    """The whole request body (the gateway middleware enforces its size limit as it arrives)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


def parse_body(raw: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise InvalidRequestError(
                "We could not parse the JSON body of your request: "
                + str(first["ctx"].get("error", "invalid JSON"))
            ) from None
        if first["type"] == "model_type" and not first["loc"]:
            raise InvalidRequestError("The request body must be a JSON object.") from None
        param = _param(first["loc"])
        count = len(exc.errors())
        more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
        raise InvalidRequestError(f"Invalid '{param}': {first['msg']}{more}.", param=param) from None


_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool"}


def _param(loc: tuple[int | str, ...]) -> str:
    """pydantic's location minus union bookkeeping: (messages, 0, user, content, str) → messages.0.content."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and i > 0 and isinstance(loc[i - 1], int) and part in _ROLE_TAGS:
            continue  # the discriminator's branch name
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict")):
            break  # a union member's type name
        parts.append(str(part))
    return ".".join(parts)


async def stream(opened: OpenedChat, writer: ChunkWriter, send: Send) -> bytes:
    """Send the SSE events as they come; return the rest (finish, usage, [DONE]) for the caller to end the
    body with, in one write."""
    usage: Usage | None = None
    try:
        async for event in opened:
            if isinstance(event, TextDelta):
                chunk = writer.delta({"content": event.text})
            elif isinstance(event, ToolCallDelta):
                call: dict[str, object] = {"index": event.index, "function": {"arguments": event.arguments}}
                if event.id:
                    call["id"] = event.id
                    call["type"] = "function"
                if event.name:
                    call["function"] = {"name": event.name, "arguments": event.arguments}
                chunk = writer.delta({"tool_calls": [call]})
            elif isinstance(event, Finish):
                last = _event(writer.delta({}, finish_reason=event.reason)) + _sources(writer, opened)
                final = _with_cost(writer.usage(usage), opened, usage)
                return last + (_event(final) if final is not None else b"") + _DONE
            else:
                usage = event
                continue
            await send({"type": "http.response.body", "body": _event(chunk), "more_body": True})
    except KeelError as exc:  # after the first byte the status is sent: report in-band, as OpenAI does
        log.warning("stream failed after it started: %s", exc.message)
        return _event(exc.envelope())
    except Exception:
        log.exception("stream failed after it started")
        return _event(
            {
                "error": {
                    "message": "Internal error during streaming.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    final = _with_cost(writer.usage(usage), opened, usage)  # no Finish: a stream ended without one
    return (_event(final) if final is not None else b"") + _DONE


def _sources(writer: ChunkWriter, opened: OpenedChat) -> bytes:
    """A chunk with no choices that carries the answer's `sources` (file_search only)."""
    sources = opened.sources()
    return b"" if sources is None else _event(writer.sources(sources))


def _with_cost(
    chunk: dict[str, Any] | None, opened: OpenedChat, usage: Usage | None
) -> dict[str, Any] | None:
    """The usage chunk with the call's `cost` in USD beside `usage` (keel.costs)."""
    if chunk is not None:
        cost = opened.cost(usage)
        if cost is not None:
            chunk["cost"] = cost.usd
    return chunk


def _event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
