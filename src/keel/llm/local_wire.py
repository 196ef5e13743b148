"""What the gateway and the local model's worker process say to each other over loopback HTTP.

The worker is Keel's own, so it speaks Keel's events rather than OpenAI's chunks: one SSE `data:` line per
`ChatEvent`, and an error as its class and fields, rebuilt on the gateway side as the same `KeelError`
(a full queue stays a 503 with Retry-After, a prompt over the window a 400 `context_length_exceeded`).
"""

from __future__ import annotations

from typing import Any

import orjson

from keel.errors import (
    InvalidRequestError,
    KeelError,
    OverloadedError,
    UpstreamError,
    UpstreamUnavailableError,
)
from keel.llm.events import ChatEvent, ChatRequest, Finish, TextDelta, Usage

# The errors a worker may report; anything else arrives as an UpstreamError.
_ERRORS: dict[str, type[KeelError]] = {
    cls.__name__: cls
    for cls in (InvalidRequestError, OverloadedError, UpstreamUnavailableError, UpstreamError)
}


def request_body(request: ChatRequest) -> bytes:
    return orjson.dumps(
        {
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop,
            "seed": request.seed,
        }
    )


def parse_request(body: bytes, alias: str) -> ChatRequest:
    fields = orjson.loads(body)
    return ChatRequest(model=alias, **fields)


def event_line(event: ChatEvent) -> bytes:
    if isinstance(event, TextDelta):
        payload: dict[str, Any] = {"t": event.text}
    elif isinstance(event, Usage):
        payload = {"usage": [event.input_tokens, event.output_tokens]}
    elif isinstance(event, Finish):
        payload = {"finish": event.reason}
    else:  # the local model makes no tool calls
        raise TypeError(f"not a local model event: {event!r}")
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_line(error: KeelError) -> bytes:
    payload = {
        "error": {
            "class": type(error).__name__,
            "message": error.message,
            "param": error.param,
            "code": error.code,
            "headers": error.headers,
        }
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def parse_event(data: str, *, model: str) -> ChatEvent:
    """One `data:` payload → its event; an error payload is raised as the KeelError it was."""
    payload = orjson.loads(data)
    if "t" in payload:
        return TextDelta(payload["t"])
    if "usage" in payload:
        return Usage(*payload["usage"])
    if "finish" in payload:
        return Finish(payload["finish"])
    error = payload["error"]
    cls = _ERRORS.get(error["class"], UpstreamError)
    message, code, headers = error["message"], error["code"], error["headers"]
    if issubclass(cls, UpstreamError):
        raise cls(message, provider="local", model=model, code=code, headers=headers)
    raise cls(message, param=error["param"], code=code, headers=headers)
