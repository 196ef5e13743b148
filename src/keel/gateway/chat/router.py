"""POST /v1/chat/completions: validate, call the service, answer JSON or SSE."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from keel.errors import ClientDisconnectedError, InvalidRequestError, KeelError
from keel.gateway.chat.protocol import ChatCompletionRequest, ChunkWriter, completion_json
from keel.gateway.chat.service import OpenedChat
from keel.gateway.deps import ChatServiceDep, PrincipalDep
from keel.gateway.disconnect import cancel_on_disconnect
from keel.llm import ChatResult, Finish, TextDelta, ToolCallDelta, Usage

log = logging.getLogger(__name__)
router = APIRouter()

CONVERSATION_HEADER = "x-keel-conversation-id"
TIMEOUT_HEADER = "x-keel-timeout"  # seconds: shortens the model alias's total deadline
PROMPT_HEADER = "x-keel-prompt"  # NAME, NAME@LABEL or NAME@VERSION of a registry prompt


@router.post("/v1/chat/completions")
async def create_chat_completion(
    request: Request, principal: PrincipalDep, service: ChatServiceDep
) -> Response:
    body = parse_body(await request.body())
    request_id: str = request.state.request_id
    opened = await cancel_on_disconnect(  # the client leaving cancels retries and backoff at once
        request.receive,
        service.open(
            principal,
            body,
            request_id,
            request.headers.get(CONVERSATION_HEADER),
            request.state.received,
            timeout_header=request.headers.get(TIMEOUT_HEADER),
            prompt_header=request.headers.get(PROMPT_HEADER),
        ),
    )
    headers = opened.headers
    if opened.conversation_id is not None:
        headers[CONVERSATION_HEADER] = opened.conversation_id
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(completion_id, created, opened.model, include_usage)
        return EventStream(opened, writer, headers | {"cache-control": "no-cache"})
    result = await cancel_on_disconnect(request.receive, collect(opened))
    return Response(
        orjson.dumps(completion_json(completion_id, created, opened.model, result)),
        media_type="application/json",
        headers=headers,
    )


async def collect(opened: OpenedChat) -> ChatResult:
    result = ChatResult()
    try:
        async for event in opened.events():
            result.add(event)
    finally:
        await opened.aclose()
    return result


class EventStream(StreamingResponse):
    """SSE that always closes its chat, even when the client left before the first byte was sent."""

    def __init__(self, opened: OpenedChat, writer: ChunkWriter, headers: dict[str, str]) -> None:
        super().__init__(sse(opened, writer), media_type="text/event-stream", headers=headers)
        self._opened = opened

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await cancel_on_disconnect(receive, self.stream_response(send))
        except ClientDisconnectedError:
            pass  # the stream was cancelled: nobody is left to tell
        finally:
            await self._opened.aclose()


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


async def sse(opened: OpenedChat, writer: ChunkWriter) -> AsyncIterator[bytes]:
    usage: Usage | None = None
    try:
        async for event in opened.events():
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
                chunk = writer.delta({}, finish_reason=event.reason)
            else:
                usage = event
                continue
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except KeelError as exc:  # after the first byte the status is sent: report in-band, as OpenAI does
        log.warning("stream failed after it started: %s", exc.message)
        yield b"data: " + orjson.dumps(exc.envelope()) + b"\n\n"
        return
    except Exception:
        log.exception("stream failed after it started")
        yield (
            b"data: "
            + orjson.dumps(
                {
                    "error": {
                        "message": "Internal error during streaming.",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            )
            + b"\n\n"
        )
        return
    final = writer.usage(usage)
    if final is not None:
        yield b"data: " + orjson.dumps(final) + b"\n\n"
    yield b"data: [DONE]\n\n"
