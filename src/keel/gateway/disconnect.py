"""Stop work the moment its client goes away, rather than when the answer is ready to be sent.

Uvicorn does not cancel a handler whose client disconnected; until the response starts, nothing would
notice. `watch_disconnect` watches the ASGI receive channel (the body has been read, so the next message
can only be `http.disconnect`) and cancels the request's task, which then cancels the upstream call, its
retries and its backoff, at once.

The watcher task starts `WATCH_AFTER` seconds into the request: most answers from a fast upstream are
done before then, and a task per request costs more than everything else the gateway does for it
(docs/performance.md). A client that leaves is still noticed within that delay.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive

from keel.errors import ClientDisconnectedError

WATCH_AFTER = 0.05  # seconds


class watch_disconnect:  # lower case: used like a function, `async with watch_disconnect(receive)`
    """Inside the block, the client leaving cancels this task; the block then raises
    `ClientDisconnectedError`. Call `stop()` before the last send: a finished response reads as a
    disconnect too."""

    __slots__ = ("_handle", "_receive", "_task", "_watcher", "left")

    def __init__(self, receive: Receive, after: float = WATCH_AFTER) -> None:
        self._receive = receive
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(after, self._start)
        self.left = False

    async def __aenter__(self) -> watch_disconnect:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if kind is asyncio.CancelledError and self.left and self._task.uncancel() == 0:
            raise ClientDisconnectedError("The client closed the connection.") from None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _start(self) -> None:
        self._handle = None
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.left = True
                self._task.cancel()
                return
