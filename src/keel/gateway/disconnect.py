"""Stop work the moment its client goes away, rather than when the answer is ready to be sent.

Uvicorn does not cancel a handler whose client disconnected; until the response starts, nothing would
notice. `cancel_on_disconnect` watches the ASGI receive channel (the body has been read, so the next
message can only be `http.disconnect`) and cancels the work, which then cancels the upstream call, its
retries and its backoff, at once. `EventStream` streams under it too: Starlette's `StreamingResponse`
watches with an anyio task group, which costs ~150 µs of CPU per stream (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from keel.errors import ClientDisconnectedError

T = TypeVar("T")


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task; raise `ClientDisconnectedError` once the client has left."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                left = True
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:
            raise ClientDisconnectedError("The client closed the connection.") from None
        raise
    finally:
        watcher.cancel()
