"""The local model's worker process: `python -m keel.llm.local_server`, watched by `keel.llm.local_process`.

llama.cpp is native code: a crash (a CPU it was not built for, a bad file) must take down this process, not
the gateway. What the gateway and this process say to each other:

- stdin, first line: JSON `{"alias", "config", "local", "token"}`. stdin then stays open; its end means the
  gateway is gone, and this process exits at once.
- stdout, one line: `{"ready": PORT}` once the model is loaded and the port listens, or `{"error": "..."}`
  (the cause and the fix) and exit status 3 when the model cannot be loaded: starting again will not help.
- HTTP on 127.0.0.1:PORT with `Authorization: Bearer TOKEN`: `POST /generate` answers an event stream
  (`keel.llm.local_wire`); `GET /health` says how many requests generate and wait. A client that closes
  its connection stops its generation within one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import aclosing
from typing import Any

import orjson
import uvicorn

from keel.errors import InvalidRequestError, KeelError, UpstreamError
from keel.llm.local_engine import CannotLoad, LocalEngine
from keel.llm.local_wire import error_line, event_line, parse_request
from keel.settings import LocalModelSettings, ModelConfig

EXIT_CANNOT_LOAD = 3
MAX_BODY_BYTES = 64 * 1024 * 1024  # the gateway bounds bodies far lower; this only guards the worker

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

log = logging.getLogger("keel.llm.local_server")


class WorkerApp:
    """The worker's two routes, as a plain ASGI app."""

    def __init__(self, engine: LocalEngine, token: str) -> None:
        self._engine = engine
        self._authorization = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self._authorization):
            await _respond(send, 401, {"error": "unauthorized"})
        elif scope["path"] == "/generate" and scope["method"] == "POST":
            await self._generate(receive, send)
        elif scope["path"] == "/health":
            await _respond(send, 200, {"generating": self._engine.generating, "queued": self._engine.queued})
        else:
            await _respond(send, 404, {"error": "not found"})

    async def _generate(self, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        pump = asyncio.ensure_future(self._pump(body, send))
        gone = asyncio.ensure_future(_disconnect(receive))
        await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not pump.done():  # the gateway closed the connection: stop generating
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump

    async def _pump(self, body: bytes, send: Send) -> None:
        try:
            request = parse_request(body, self._engine.alias)
            async with aclosing(self._engine.stream(request)) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event_line(event), "more_body": True})
        except KeelError as exc:
            await send({"type": "http.response.body", "body": error_line(exc), "more_body": True})
        except (ValueError, TypeError) as exc:  # a request this worker cannot read: a Keel bug, said plainly
            unreadable = InvalidRequestError(f"local model worker cannot read the request: {exc}")
            await send({"type": "http.response.body", "body": error_line(unreadable), "more_body": True})
        except Exception as exc:
            log.exception("local model generation failed")
            failed = UpstreamError(f"local model failed: {exc}", provider="local", model=self._engine.alias)
            await send({"type": "http.response.body", "body": error_line(failed), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": orjson.dumps(payload)})


def _say(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


def _exit_with_parent() -> None:
    """stdin ends when the gateway is gone, however it went (even SIGKILL): then so does this process."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(65536):
            pass
    os._exit(0)


async def serve(spec: dict[str, Any]) -> int:
    config = ModelConfig.model_validate(spec["config"])
    local = LocalModelSettings.model_validate(spec["local"])
    engine = LocalEngine(spec["alias"], config, local)
    try:
        await engine.start()
    except CannotLoad as exc:
        _say({"error": str(exc)})
        return EXIT_CANNOT_LOAD
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small event per token
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections queue from here on, so the gateway may use the port at once
    _say({"ready": sock.getsockname()[1]})
    os.dup2(2, 1)  # nothing more goes to the pipe the gateway stopped reading
    server = uvicorn.Server(
        uvicorn.Config(
            WorkerApp(engine, spec["token"]),
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
        )
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        await engine.aclose()
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = orjson.loads(sys.stdin.buffer.readline())
    threading.Thread(target=_exit_with_parent, name="keel-parent-watch", daemon=True).start()
    try:
        import uvloop  # as the gateway runs: cheaper wake-ups per token
    except ImportError:  # Windows
        sys.exit(asyncio.run(serve(spec)))
    sys.exit(uvloop.run(serve(spec)))


if __name__ == "__main__":
    main()
