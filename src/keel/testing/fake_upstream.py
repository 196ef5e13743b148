"""A real HTTP server that speaks the OpenAI and Anthropic wire formats, scripted by tests and benchmarks.

It runs its own event loop in a background thread, so sync tests, async tests and other threads can all
use it. Replies are scripted with `Reply` (text, tool calls, errors, delays) and it injects faults on
command: status codes with or without Retry-After, added latency, never answering, a connection reset
before the headers, a stream cut or stalled after K chunks, malformed JSON or SSE, Anthropic's 529.
Script it per request (`responder`) or as a scenario queue (`enqueue`); every request is recorded.
Run it alone for benchmarks: `python -m keel.testing.fake_upstream --port 8081`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Literal

import orjson
from aiohttp import web

from keel.testing._background import BackgroundServer

HOST = "127.0.0.1"
MODEL_IDS = ("fake-gpt", "fake-claude")

# OpenAI finish reasons → Anthropic stop reasons; anything else is sent as given (e.g. "stop_sequence").
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_ARGUMENT_PIECE = 16  # characters of tool-call arguments per streamed chunk


@dataclass
class Reply:
    """What the fake answers to one request."""

    text: str = "Hello from FakeUpstream."
    chunks: list[str] | None = None  # how `text` is streamed; default: word-sized pieces
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments"}
    finish_reason: str | None = None  # default "stop", or "tool_calls" when there are tool calls
    input_tokens: int | None = None  # default: about one token per four bytes of request body
    output_tokens: int | None = None  # default: about one token per four characters of output
    cached_input_tokens: int = 0  # of the input tokens, reported as read from the prompt cache
    status: int = 200  # anything else answers an error body in the route's wire format
    error_message: str | None = None
    error_type: str | None = None  # for error bodies and `stream_error`; default from the status
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers, e.g. Retry-After
    delay: float = 0.0  # seconds before answering
    chunk_delay: float = 0.0  # seconds between streamed chunks
    stream_error: str | None = None  # stream the text, then this error event instead of finishing
    raw_stream: list[str] | None = None  # sent verbatim, piece by piece, as a streamed body
    # Faults. "Pieces" are the SSE events of the stream, the opening one included.
    hang: bool = False  # never answer (no status, no headers) until the client leaves
    reset: bool = False  # drop the connection before the status line
    cut_after: int | None = None  # stream this many pieces, then drop the connection (streams only)
    stall_after: int | None = None  # stream this many pieces, then go silent for good (streams only)
    malformed: Literal["json", "sse"] | None = None  # a chunk of broken JSON; a 200 body that is not SSE

    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")

    def pieces(self) -> tuple[str, ...]:
        return tuple(self.chunks) if self.chunks is not None else _words(self.text)

    def output_token_count(self) -> int:
        if self.output_tokens is not None:
            return self.output_tokens
        arguments = sum(len(_arguments(call)) for call in self.tool_calls)
        return max(1, (len(self.text) + arguments) // 4)

    def error(self) -> tuple[str, str]:
        kind = self.error_type or _ERROR_TYPES.get(self.status, "api_error")
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Overloaded" if self.status == 529 else "Error"
        return kind, self.error_message or f"FakeUpstream scripted {self.status} {phrase}"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    body: Any  # parsed JSON, or None


@lru_cache(maxsize=1024)
def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\s*\S+\s*", text)) or ((text,) if text else ())


def _arguments(call: dict[str, Any]) -> str:
    arguments = call.get("arguments", "{}")
    return arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()


def _split(text: str) -> list[str]:
    return [text[i : i + _ARGUMENT_PIECE] for i in range(0, len(text), _ARGUMENT_PIECE)]


def unused_base_url(path: str = "/v1") -> str:
    """A URL on 127.0.0.1 where nothing listens: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    return f"http://{HOST}:{port}{path}"


_BROKEN_JSON = b'{"id": "chatcmpl-fake", "choices": ['
_NOT_SSE = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"


def _malformed_stream(route: str) -> list[bytes]:
    if route == "anthropic":
        return [b'event: message_start\ndata: {"type": "message_start", "message": {"id": \n\n']
    opening = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [{"index": 0}]}
    return [b"data: " + orjson.dumps(opening) + b"\n\n", b'data: {"choices": [{"delta": {"content": "br\n\n']


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # the benchmark pushes thousands of requests a second through here
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class FakeUpstream(BackgroundServer):
    thread_name = "fake-upstream"

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        return _new_loop()

    def __init__(
        self,
        port: int = 0,
        api_key: str | None = None,
        *,
        record: bool = True,
        keepalive_timeout: float = 75.0,  # idle connections are closed after this many seconds
    ) -> None:
        super().__init__()
        self.port = port
        self.keepalive_timeout = keepalive_timeout
        self.api_key = api_key
        self.default_reply = Reply()
        self.requests: list[RecordedRequest] = []  # not kept when record=False (long benchmarks)
        self._record = record
        self._replies: deque[Reply] = deque()
        # Consulted when the queue is empty; None from it means `default_reply`. Runs on the fake's loop.
        self.responder: Callable[[RecordedRequest], Reply | None] | None = None
        self._in_flight = 0
        self._cancelled = 0
        self._cancelled_changed = threading.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def enqueue(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order; then `default_reply` again."""
        self._replies.extend(replies)

    def reset(self) -> None:
        """Forget requests, queued replies and cancellations; back to the stock default reply."""
        self.default_reply = Reply()
        self.responder = None
        self.requests.clear()
        self._replies.clear()
        with self._cancelled_changed:
            self._cancelled = 0

    @property
    def cancelled_streams(self) -> int:
        """Streams whose client went away before the end."""
        with self._cancelled_changed:
            return self._cancelled

    def wait_for_cancelled(self, n: int = 1, timeout: float = 2.0) -> bool:
        """Block the calling thread until `n` streams in all were abandoned; False on timeout."""
        with self._cancelled_changed:
            return self._cancelled_changed.wait_for(lambda: self._cancelled >= n, timeout)

    @property
    def in_flight(self) -> int:
        """Requests being answered now (a hung or stalled one stays until its client leaves)."""
        with self._cancelled_changed:
            return self._in_flight

    def wait_until_idle(self, timeout: float = 2.0) -> bool:
        """Block until no request is being answered; False on timeout."""
        with self._cancelled_changed:
            return self._cancelled_changed.wait_for(lambda: self._in_flight == 0, timeout)

    # -- lifecycle

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client that leaves is noticed at once, even between chunks.
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=1.0,
            keepalive_timeout=self.keepalive_timeout,
        )
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, HOST, self.port, backlog=4096).start()
        self.port = runner.addresses[0][1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- routes

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "openai", _openai_error, _openai_body, _openai_stream)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "anthropic", _anthropic_error, _anthropic_body, _anthropic_stream)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._keep(request, None)
        if not self._authorized(request):
            return _openai_error(Reply(status=401, error_message="invalid api key"))
        # One listing both SDKs accept: OpenAI's fields and Anthropic's side by side.
        models = [
            {"id": name, "object": "model", "type": "model", "created": 0, "owned_by": "keel"}
            | {"display_name": name, "created_at": "2025-01-01T00:00:00Z"}
            for name in MODEL_IDS
        ]
        listing = {"object": "list", "data": models, "has_more": False}
        return web.Response(
            body=orjson.dumps(listing | {"first_id": MODEL_IDS[0], "last_id": MODEL_IDS[-1]}),
            content_type="application/json",
        )

    async def _answer(
        self,
        request: web.Request,
        route: str,
        error: Callable[[Reply], web.Response],
        complete: Callable[[Reply, dict[str, Any], int], dict[str, Any]],
        stream: Callable[[Reply, dict[str, Any], int], list[bytes]],
    ) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        recorded = self._keep(request, body)
        if not self._authorized(request):
            return error(Reply(status=401, error_message="invalid api key"))
        if not isinstance(body, dict):
            return error(Reply(status=400, error_message="the body is not a JSON object"))
        reply = self._next_reply(request, recorded, body)
        input_tokens = reply.input_tokens if reply.input_tokens is not None else max(1, len(raw) // 4)
        self._count_in_flight(1)
        try:
            if not body.get("stream"):
                await self._fault(request, reply)
                if reply.status != 200:
                    return error(reply)
                if reply.malformed is not None:
                    return web.Response(body=_BROKEN_JSON, content_type="application/json")
                return web.Response(
                    body=orjson.dumps(complete(reply, body, input_tokens)),
                    content_type="application/json",
                    headers=reply.headers,
                )
            try:
                await self._fault(request, reply)
                if reply.status != 200:
                    return error(reply)
                if reply.malformed == "sse":
                    return web.Response(body=_NOT_SSE, content_type="text/html")
                if reply.malformed == "json":
                    pieces = _malformed_stream(route)
                elif reply.raw_stream is not None:
                    pieces = [piece.encode() for piece in reply.raw_stream]
                else:
                    pieces = stream(reply, body, input_tokens)
                return await self._send(request, reply, pieces)
            except (asyncio.CancelledError, ConnectionResetError):
                if not (reply.reset or reply.cut_after is not None):  # not our own doing: the client left
                    with self._cancelled_changed:
                        self._cancelled += 1
                        self._cancelled_changed.notify_all()
                raise
        finally:
            self._count_in_flight(-1)

    def _next_reply(self, request: web.Request, recorded: RecordedRequest | None, body: Any) -> Reply:
        if self._replies:
            return self._replies.popleft()
        if self.responder is not None:
            if recorded is None:
                headers = {name.lower(): value for name, value in request.headers.items()}
                recorded = RecordedRequest(request.method, request.path, headers, body)
            scripted = self.responder(recorded)
            if scripted is not None:
                return scripted
        return self.default_reply

    def _count_in_flight(self, change: int) -> None:
        with self._cancelled_changed:
            self._in_flight += change
            self._cancelled_changed.notify_all()

    async def _fault(self, request: web.Request, reply: Reply) -> None:
        """The faults that strike before the status line: latency, silence, a reset."""
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.reset:
            _drop(request)
        if reply.hang or reply.reset:
            await asyncio.Event().wait()  # until the connection is gone and this handler cancelled

    async def _send(self, request: web.Request, reply: Reply, pieces: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS | reply.headers)
        await response.prepare(request)
        stop = min(x for x in (reply.cut_after, reply.stall_after, len(pieces)) if x is not None)
        if reply.chunk_delay:
            for number, piece in enumerate(pieces[:stop]):
                if number:
                    await asyncio.sleep(reply.chunk_delay)
                await response.write(piece)
        elif stop:
            await response.write(b"".join(pieces[:stop]))  # one write: the fast path for benchmarks
        if reply.cut_after is not None and reply.cut_after <= stop:
            _drop(request)
            await asyncio.Event().wait()
        if reply.stall_after is not None:
            await asyncio.Event().wait()  # silent until the client gives up
        await response.write_eof()
        return response

    def _keep(self, request: web.Request, body: Any) -> RecordedRequest | None:
        if not self._record:
            return None
        headers = {name.lower(): value for name, value in request.headers.items()}
        recorded = RecordedRequest(request.method, request.path, headers, body)
        self.requests.append(recorded)
        return recorded

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        headers = request.headers
        return (
            headers.get("x-api-key") == self.api_key
            or headers.get("authorization") == f"Bearer {self.api_key}"
        )


def _drop(request: web.Request) -> None:
    """Close the connection abruptly, as a crashed server or a proxy timeout would."""
    transport = request.transport
    if transport is not None:
        transport.abort()


# -- OpenAI Chat Completions


def _openai_error(reply: Reply) -> web.Response:
    kind, message = reply.error()
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(
        status=reply.status, body=orjson.dumps(body), content_type="application/json", headers=reply.headers
    )


def _openai_tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": call.get("id") or f"call_fake{index}",
            "type": "function",
            "function": {"name": call["name"], "arguments": _arguments(call)},
        }
        for index, call in enumerate(reply.tool_calls)
    ]


def _openai_usage(reply: Reply, input_tokens: int) -> dict[str, Any]:
    output_tokens = reply.output_token_count()
    usage: dict[str, Any] = {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    if reply.cached_input_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_input_tokens}
    return usage


def _openai_body(reply: Reply, request: dict[str, Any], input_tokens: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = _openai_tool_calls(reply)
    return {
        "id": f"chatcmpl-fake{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model") or MODEL_IDS[0],
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish()}],
        "usage": _openai_usage(reply, input_tokens),
        "system_fingerprint": None,
    }


def _openai_stream(reply: Reply, request: dict[str, Any], input_tokens: int) -> list[bytes]:
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    head: dict[str, Any] = {
        "id": f"chatcmpl-fake{time.monotonic_ns()}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.get("model") or MODEL_IDS[0],
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        payload = head | {"choices": [choice]}
        if include_usage:
            payload["usage"] = None  # as OpenAI does: every chunk but the last carries "usage": null
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    pieces = [chunk({"role": "assistant", "content": ""})]
    pieces += [chunk({"content": text}) for text in reply.pieces()]
    for index, call in enumerate(_openai_tool_calls(reply)):
        function = call["function"]
        opening = call | {"index": index, "function": {"name": function["name"], "arguments": ""}}
        pieces.append(chunk({"tool_calls": [opening]}))
        for part in _split(function["arguments"]):
            pieces.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
    if reply.stream_error is not None:
        kind = reply.error_type or "server_error"
        error = {"message": reply.stream_error, "type": kind, "param": None, "code": None}
        pieces.append(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
        return pieces
    pieces.append(chunk({}, reply.finish()))
    if include_usage:
        usage = head | {"choices": [], "usage": _openai_usage(reply, input_tokens)}
        pieces.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    pieces.append(b"data: [DONE]\n\n")
    return pieces


# -- Anthropic Messages


def _anthropic_error(reply: Reply) -> web.Response:
    kind, message = reply.error()
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.Response(
        status=reply.status, body=orjson.dumps(body), content_type="application/json", headers=reply.headers
    )


def _anthropic_tool_uses(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "type": "tool_use",
            "id": call.get("id") or f"toolu_fake{index}",
            "name": call["name"],
            "input": orjson.loads(_arguments(call)),
        }
        for index, call in enumerate(reply.tool_calls)
    ]


def _anthropic_body(reply: Reply, request: dict[str, Any], input_tokens: int) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
    stop = reply.finish()
    return {
        "id": f"msg_fake{time.monotonic_ns()}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model") or MODEL_IDS[1],
        "content": content + _anthropic_tool_uses(reply),
        "stop_reason": _STOP_REASONS.get(stop, stop),
        "stop_sequence": None,
        "usage": _anthropic_usage(reply, input_tokens) | {"output_tokens": reply.output_token_count()},
    }


def _anthropic_usage(reply: Reply, input_tokens: int) -> dict[str, int]:
    """Anthropic counts cache reads apart from `input_tokens`."""
    cached = min(reply.cached_input_tokens, input_tokens)
    usage = {"input_tokens": input_tokens - cached}
    if cached:
        usage["cache_read_input_tokens"] = cached
    return usage


def _event(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


_PING = _event(b"ping", {"type": "ping"})


def _anthropic_stream(reply: Reply, request: dict[str, Any], input_tokens: int) -> list[bytes]:
    message = _anthropic_body(reply, request, input_tokens)
    usage = _anthropic_usage(reply, input_tokens) | {"output_tokens": 1}
    start = message | {"content": [], "stop_reason": None, "usage": usage}
    pieces = [_event(b"message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        pieces += _anthropic_block(reply, index, block)
    if reply.stream_error is not None:
        error = {"type": reply.error_type or "api_error", "message": reply.stream_error}
        pieces.append(_event(b"error", {"type": "error", "error": error}))
        return pieces
    ending = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    counts = {"output_tokens": message["usage"]["output_tokens"]}
    pieces.append(_event(b"message_delta", {"type": "message_delta", "delta": ending, "usage": counts}))
    pieces.append(_event(b"message_stop", {"type": "message_stop"}))
    return pieces


def _anthropic_block(reply: Reply, index: int, block: dict[str, Any]) -> list[bytes]:
    if block["type"] == "text":
        opening = block | {"text": ""}
        deltas = [{"type": "text_delta", "text": text} for text in reply.pieces()]
    else:
        opening = block | {"input": {}}
        arguments = orjson.dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": part} for part in _split(arguments)]
    pieces = [
        _event(
            b"content_block_start", {"type": "content_block_start", "index": index, "content_block": opening}
        )
    ]
    if index == 0:
        pieces.append(_PING)  # where the real API sends its first ping
    for delta in deltas:
        pieces.append(
            _event(b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        )
    pieces.append(_event(b"content_block_stop", {"type": "content_block_stop", "index": index}))
    return pieces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI/Anthropic upstream until stopped.")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--api-key", default=None, help="require this key (Bearer or x-api-key)")
    args = parser.parse_args(argv)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the server thread starts, so it inherits the mask and sigwait below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    fake = FakeUpstream(port=args.port, api_key=args.api_key, record=False).start()
    print(f"listening on {fake.base_url}", flush=True)
    signal.sigwait(stop_signals)
    fake.stop()


if __name__ == "__main__":
    main()
