"""The one provider interface. Resilience (retry, fallback, breaker) wraps a ChatModel and is one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypeAlias, runtime_checkable

from keel.llm.events import ChatEvent, ChatRequest


@runtime_checkable
class ChatModel(Protocol):
    """A model behind an alias. `stream` yields text and tool-call deltas, then `Usage`, then `Finish`.

    Failures raise `keel.errors.KeelError` subclasses (UpstreamError and kin) before or during the
    stream. Closing the iterator early (client gone) must stop the generation upstream.
    """

    provider: str

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]: ...

    def supports_tools(self) -> bool: ...

    async def aclose(self) -> None: ...


Opened: TypeAlias = tuple[ChatEvent, AsyncIterator[ChatEvent]]  # the first event, and the rest of the stream


async def open_stream(model: ChatModel, request: ChatRequest) -> Opened:
    """Start `model`'s stream and wait for its first event. Raises what the model raised before it (the
    stream is closed then), or StopAsyncIteration for a stream without events.

    A model whose work ends at the first event (retry, fallback, balancer) implements `open` and hands back
    the stream it chose, so that it costs nothing per event (docs/performance.md).
    """
    opener = getattr(model, "open", None)
    if opener is not None:
        opened: Opened = await opener(request)
        return opened
    events = model.stream(request)
    try:
        first = await anext(events)
    except BaseException:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
        raise
    return first, events
