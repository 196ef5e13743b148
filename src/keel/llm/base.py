"""The one provider interface. Resilience (retry, fallback, breaker) wraps a ChatModel and is one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

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
