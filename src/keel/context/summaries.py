"""Rolling summaries, written in the background: a turn never waits for one.

When a turn's context uses most of its budget (or already drops turns), the context manager schedules the
conversation here. A worker folds the previous summary and the older turns (all but the newest that fill
`summary_keep` of the budget) into a new summary with the `summary_model` alias, through the same
pipeline as any call (so it is audited, traced and costed, tagged `kind = "summary"`). The instructions
are the tenant's registry prompt `keel-summary` (label production) when there is one, else the built-in
text below: a summary prompt can change without a deploy. One job per conversation at a time across
replicas (a PostgreSQL advisory lock); a failed or slow summary changes nothing for the user.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.context.conversations import _history, _newest_summary, stored_turn
from keel.context.window import Counter, Turn, turn_groups
from keel.db.tables import conversation_summaries
from keel.errors import NotFoundError
from keel.settings import ContextSettings

log = logging.getLogger(__name__)

SUMMARY_PROMPT = "keel-summary"  # the registry prompt a tenant may create to change the instructions
INSTRUCTIONS = (
    "You maintain a running summary of a conversation between a user and an assistant. Merge the previous "
    "summary (if any) with the new turns into one concise summary, in the third person. Keep names, facts, "
    "numbers, decisions, open questions and the user's preferences; drop greetings and filler. Answer with "
    "the summary only."
)
Message = dict[str, Any]


class CounterSource(Protocol):
    def for_alias(self, alias: str) -> Counter: ...


# (tenant, conversation, transcript messages, registry prompt or None, summary alias, request id) → text
Run = Callable[[uuid.UUID, str, list[Message], str | None, str, str], Awaitable[str]]


class Summarizer:
    def __init__(self, engine: AsyncEngine, counters: CounterSource, settings: ContextSettings) -> None:
        self._engine = engine
        self._counters = counters
        self._settings = settings
        self._queue: asyncio.Queue[tuple[uuid.UUID, str, str, int]] = asyncio.Queue(settings.summary_queue)
        self._waiting: set[tuple[uuid.UUID, str]] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._run: Run | None = None
        self.written = 0
        self.failed = 0

    def bind(self, run: Run) -> None:
        """How a summary is asked for: the pipeline, built after the context manager that schedules here."""
        self._run = run

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._settings.summary_workers)]

    async def aclose(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def schedule(self, tenant_id: uuid.UUID, conversation_id: str, alias: str, budget: int) -> None:
        key = (tenant_id, conversation_id)
        if key in self._waiting or not self._workers:
            return
        try:
            self._queue.put_nowait((tenant_id, conversation_id, alias, budget))
        except asyncio.QueueFull:
            log.warning("summary queue full: conversation %s waits for its next turn", conversation_id)
            return
        self._waiting.add(key)

    async def idle(self) -> None:
        """Wait until every scheduled summary is done (tests, benches)."""
        await self._queue.join()

    async def _work(self) -> None:
        while True:
            tenant_id, conversation_id, alias, budget = await self._queue.get()
            try:
                await self.summarize(tenant_id, conversation_id, alias, budget)
            except Exception:  # the user's turns do not depend on it; the next turn schedules it again
                self.failed += 1
                log.exception("summary of conversation %s failed", conversation_id)
            finally:
                self._waiting.discard((tenant_id, conversation_id))
                self._queue.task_done()

    async def summarize(self, tenant_id: uuid.UUID, conversation_id: str, alias: str, budget: int) -> bool:
        """Fold the older turns into a new summary; False when another replica holds the job or there
        is nothing to fold."""
        if self._run is None:
            raise RuntimeError("Summarizer.bind was not called")
        counter = self._counters.for_alias(alias)
        summarizer = self._counters.for_alias(self._settings.summary_model)
        async with self._engine.connect() as conn:
            lock = f"keel.summary:{tenant_id}:{conversation_id}"
            if not await conn.scalar(select(func.pg_try_advisory_lock(func.hashtextextended(lock, 0)))):
                return False
            try:
                previous = await _newest_summary(conn, tenant_id, conversation_id)
                after = previous.covers_message_id if previous is not None else 0
                rows = await conn.execute(_history(tenant_id, conversation_id, after))
                turns = [stored_turn(r.id, r.message, r.tokens, r.tokenizer, counter) for r in rows]
                await conn.commit()  # no transaction stays open while the model writes
                room = budget - (previous.tokens if previous is not None else 0) - 200  # 200: instructions
                fold = _to_fold(turns, int(budget * self._settings.summary_keep), room)
                if not fold:
                    return False
                transcript = _transcript(previous.text if previous is not None else None, fold)
                request_id = f"summary_{uuid.uuid4().hex}"
                summary = await self._ask(tenant_id, conversation_id, transcript, request_id)
                version = (previous.version if previous is not None else 0) + 1
                await conn.execute(
                    conversation_summaries.insert().values(
                        tenant_id=tenant_id,
                        conversation_id=conversation_id,
                        text=summary,
                        covers_message_id=max(t.id for t in fold if t.id is not None),
                        model=self._settings.summary_model,
                        tokens=summarizer.count_message({"role": "system", "content": summary}),
                        tokenizer=summarizer.name,
                        version=version,
                        request_id=request_id,
                    )
                )
                await conn.commit()
                self.written += 1
                return True
            finally:
                await conn.rollback()  # whatever failed above: the unlock needs a usable transaction
                await conn.execute(select(func.pg_advisory_unlock(func.hashtextextended(lock, 0))))
                await conn.commit()

    async def _ask(self, tenant_id: uuid.UUID, conversation_id: str, transcript: str, request_id: str) -> str:
        assert self._run is not None
        messages: list[Message] = [{"role": "user", "content": transcript}]
        try:
            return await self._run(
                tenant_id, conversation_id, messages, SUMMARY_PROMPT, self._settings.summary_model, request_id
            )
        except NotFoundError as exc:
            if exc.code not in ("prompt_not_found", "label_not_found"):
                raise
        messages.insert(0, {"role": "system", "content": INSTRUCTIONS})
        return await self._run(
            tenant_id, conversation_id, messages, None, self._settings.summary_model, request_id
        )


def _to_fold(turns: list[Turn], keep: int, room: int) -> list[Turn]:
    """The turn groups to fold: all but the newest ones that fit in `keep` tokens (the newest always
    stays), oldest first, as many as fit in `room` (the rest go in the next summary)."""
    groups = turn_groups(turns)
    kept = 0
    while groups:
        size = sum(t.tokens for t in groups[-1])
        if kept and kept + size > keep:
            break
        kept += size
        groups.pop()
    fold: list[Turn] = []
    used = 0
    for group in groups:
        size = sum(t.tokens for t in group)
        if fold and used + size > room:
            break
        fold += group
        used += size
    return fold


def _transcript(previous: str | None, turns: list[Turn]) -> str:
    lines = [f"Previous summary:\n{previous}\n"] if previous else []
    lines.append("New turns:")
    for turn in turns:
        message = turn.message
        role = message.get("role", "")
        content = message.get("content")
        if not isinstance(content, str):
            content = orjson.dumps(content).decode() if content is not None else ""
        if message.get("tool_calls"):
            content += " [tool calls: " + orjson.dumps(message["tool_calls"]).decode() + "]"
        lines.append(f"{role}: {content}")
    return "\n".join(lines)
