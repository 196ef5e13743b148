"""What every resilience wrapper shares: it is a ChatModel around another one."""

from __future__ import annotations

from collections.abc import AsyncIterator

from keel.llm.base import ChatModel, Opened
from keel.llm.events import ChatEvent, ChatRequest


class WrapperModel:
    """A ChatModel around `inner`. Wrappers never close what they wrap: the factory owns the providers,
    and one alias's stack is shared by the fallback chains of others."""

    def __init__(self, inner: ChatModel) -> None:
        self.inner = inner
        self.provider = inner.provider

    def supports_tools(self) -> bool:
        return self.inner.supports_tools()

    async def aclose(self) -> None:
        """The providers are closed by whoever built the stack."""


class OpeningWrapper(WrapperModel):
    """A wrapper whose work ends at the first event: choosing a deployment, retrying, falling back. It
    implements `open` (see `keel.llm.base.open_stream`); `stream` is derived from it for callers that
    iterate a ChatModel plainly."""

    async def open(self, request: ChatRequest) -> Opened:
        raise NotImplementedError

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        try:
            first, events = await self.open(request)
        except StopAsyncIteration:
            return
        async with closing(events):
            yield first
            async for event in events:
                yield event


class closing:  # lower case: used like contextlib.aclosing
    """`async with closing(stream)`: close the stream however the block ends, so an abandoned upstream call
    stops at once. (A class: cheaper than an @asynccontextmanager, and there is one per layer per call.)"""

    __slots__ = ("_events",)

    def __init__(self, events: AsyncIterator[ChatEvent]) -> None:
        self._events = events

    async def __aenter__(self) -> AsyncIterator[ChatEvent]:
        return self._events

    async def __aexit__(self, *exc_info: object) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()
