"""At most `limit` calls at once to one deployment; the others wait, never past the request's deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from keel.errors import UpstreamTimeoutError
from keel.llm.base import ChatModel
from keel.llm.events import ChatEvent, ChatRequest
from keel.llm.resilience._wrapper import WrapperModel, closing
from keel.llm.resilience.classify import FailureKind
from keel.llm.resilience.deadline import remaining


class ConcurrencyLimit(WrapperModel):
    def __init__(self, inner: ChatModel, limit: int, *, name: str) -> None:
        super().__init__(inner)
        self.limit = limit
        self.name = name
        self._slots = asyncio.Semaphore(limit)

    def has_capacity(self) -> bool:
        return not self._slots.locked()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        try:
            async with asyncio.timeout(remaining(request.trace)):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"deployment {self.name!r} had no free slot (max_concurrent={self.limit}) "
                "before the deadline",
                provider=self.provider,
                model=self.name,
                code=FailureKind.DEADLINE.value,
            ) from None
        try:
            async with closing(self.inner.stream(request)) as events:
                async for event in events:
                    yield event
        finally:
            self._slots.release()
