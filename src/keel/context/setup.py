"""The context layer's part of the composition root: token counters, the context manager, summaries."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from keel.context.conversations import ConversationStore
from keel.context.manager import ContextManager, FactorRecorder
from keel.context.summaries import Run, Summarizer
from keel.db.writer import WriteQueue
from keel.llm.tokens import TokenCounters
from keel.settings import Settings

log = logging.getLogger(__name__)

FACTOR_FLUSH_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class ContextLayer:
    manager: ContextManager
    conversations: ConversationStore
    counters: TokenCounters
    summarizer: Summarizer
    factors: FactorRecorder

    def bind(self, run: Run) -> None:
        self.summarizer.bind(run)


async def start_context(
    settings: Settings, stack: AsyncExitStack, engine: AsyncEngine, writes: WriteQueue, *, serving: bool
) -> ContextLayer:
    counters = TokenCounters(settings)
    await asyncio.to_thread(counters.preload)  # tokenizer files load once, before the first turn
    stack.callback(counters.close)
    await counters.factors.load(engine)
    conversations = ConversationStore(engine, writes)
    stack.push_async_callback(conversations.drain)  # runs before writes.close (LIFO)
    summarizer = Summarizer(engine, counters, settings.context)
    if serving:
        summarizer.start()
        stack.push_async_callback(summarizer.aclose)
        flusher = asyncio.create_task(_flush_factors_forever(counters, engine))
        stack.callback(flusher.cancel)
    stack.push_async_callback(_flush_factors, counters, engine)  # what was learned last is kept
    manager = ContextManager(conversations, counters, settings, summaries=summarizer)
    return ContextLayer(manager, conversations, counters, summarizer, FactorRecorder(counters))


async def _flush_factors(counters: TokenCounters, engine: AsyncEngine) -> None:
    try:
        await counters.factors.flush(engine)
    except Exception:  # learned again from the next answers
        log.warning("token factors could not be stored", exc_info=True)


async def _flush_factors_forever(counters: TokenCounters, engine: AsyncEngine) -> None:
    while True:
        await asyncio.sleep(FACTOR_FLUSH_SECONDS)
        await _flush_factors(counters, engine)
