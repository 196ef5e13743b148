"""ChatPipeline: the stages of one chat request. No HTTP and no SQL here, only components.

1. resolve prompt        PromptResolver   (pass-through until the prompt registry lands)
2. load conversation  ┐  ConversationStore (prior turns; the new user turn is durable first)
3. retrieve           ┘  Retriever        (pass-through until RAG lands); 2 and 3 run concurrently
4. assemble context      ContextAssembler (prompt + retrieved + history + new turns)
5. call the model        ModelRegistry → ChatModel (resilience wraps it later)
6. deliver               the caller iterates the events as they come
7. record                Recorder, off the critical path
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from keel.context import ConversationStore
from keel.llm import ChatEvent, ChatRequest, ChatResult, ModelRegistry

log = logging.getLogger(__name__)

Message = dict[str, Any]


@dataclass(slots=True)
class ChatCall:
    """One chat request as the pipeline sees it."""

    request_id: str
    tenant_id: uuid.UUID
    request: ChatRequest
    conversation_id: str | None = None
    prompt: dict[str, Any] | None = None  # the `prompt` extension field, for the prompt registry


@dataclass(frozen=True, slots=True)
class RetrievedChunk:
    id: str
    text: str
    score: float
    source: str = ""


@dataclass(slots=True)
class CallOutcome:
    """What the record stage gets: the call, what was sent, and what came back (or the error)."""

    call: ChatCall
    sent: ChatRequest
    result: ChatResult
    error: BaseException | None = None
    started: float = 0.0
    finished: float = 0.0
    retrieved: list[RetrievedChunk] = field(default_factory=list)


class PromptResolver(Protocol):
    async def resolve(self, call: ChatCall) -> list[Message]: ...


class Retriever(Protocol):
    async def retrieve(self, call: ChatCall) -> list[RetrievedChunk]: ...


class Recorder(Protocol):
    def record(self, outcome: CallOutcome) -> None:
        """Must not block: queue the writes and return."""


class NoPrompt:
    async def resolve(self, call: ChatCall) -> list[Message]:
        return []


class NoRetrieval:
    async def retrieve(self, call: ChatCall) -> list[RetrievedChunk]:
        return []


class ContextAssembler:
    """System and developer messages first, then the prompt, then retrieved context, history, new turns."""

    def assemble(
        self,
        prompt: list[Message],
        history: list[Message],
        retrieved: list[RetrievedChunk],
        new: list[Message],
    ) -> list[Message]:
        if not (prompt or history or retrieved):
            return new
        leading = [m for m in new if m["role"] in ("system", "developer")]
        rest = [m for m in new if m["role"] not in ("system", "developer")]
        context: list[Message] = []
        if retrieved:
            sources = "\n\n".join(f"[{i + 1}] {chunk.text}" for i, chunk in enumerate(retrieved))
            context.append({"role": "system", "content": f"Context:\n{sources}"})
        return [*prompt, *leading, *context, *history, *rest]


class ConversationRecorder:
    """Stores the assistant's reply of a successful conversation turn."""

    def __init__(self, conversations: ConversationStore) -> None:
        self._conversations = conversations

    def record(self, outcome: CallOutcome) -> None:
        call = outcome.call
        if call.conversation_id is None or outcome.error is not None:
            return
        reply: Message = {"role": "assistant", "content": outcome.result.text or None}
        if outcome.result.tool_calls:
            reply["tool_calls"] = outcome.result.tool_calls
        self._conversations.append_later(call.tenant_id, call.conversation_id, reply, call.request_id)


class ChatPipeline:
    def __init__(
        self,
        models: ModelRegistry,
        conversations: ConversationStore,
        *,
        prompts: PromptResolver | None = None,
        retriever: Retriever | None = None,
        assembler: ContextAssembler | None = None,
        recorders: list[Recorder] | None = None,
    ) -> None:
        self._models = models
        self._conversations = conversations
        self._prompts = prompts or NoPrompt()
        self._retriever = retriever or NoRetrieval()
        self._assembler = assembler or ContextAssembler()
        self._recorders = recorders if recorders is not None else [ConversationRecorder(conversations)]

    async def stream(self, call: ChatCall) -> AsyncGenerator[ChatEvent, None]:
        """Yield the model's events. Errors before the first event surface as they are (for HTTP status)."""
        started = time.perf_counter()
        model = self._models.get(call.request.model)  # unknown alias: NotFoundError before any work
        prompt = await self._prompts.resolve(call)
        history, retrieved = await self._load_and_retrieve(call)
        messages = self._assembler.assemble(prompt, history, retrieved, call.request.messages)
        sent = replace(call.request, messages=messages)
        outcome = CallOutcome(call, sent, ChatResult(), started=started, retrieved=retrieved)
        try:
            async for event in model.stream(sent):
                outcome.result.add(event)
                yield event
        except BaseException as exc:  # recorded as failed, then re-raised untouched
            outcome.error = exc
            raise
        finally:
            outcome.finished = time.perf_counter()
            self._record(outcome)

    async def _load_and_retrieve(self, call: ChatCall) -> tuple[list[Message], list[RetrievedChunk]]:
        if call.conversation_id is None:
            return [], await self._retriever.retrieve(call)
        new = [m for m in call.request.messages if m["role"] not in ("system", "developer")]
        return await asyncio.gather(
            self._conversations.begin_turn(call.tenant_id, call.conversation_id, new, call.request_id),
            self._retriever.retrieve(call),
        )

    def _record(self, outcome: CallOutcome) -> None:
        for recorder in self._recorders:
            try:
                recorder.record(outcome)
            except Exception:  # a failing recorder must not turn a delivered answer into an error
                log.exception("recorder %s failed for request %s", recorder, outcome.call.request_id)
