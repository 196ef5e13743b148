"""The context manager's costs, over a real PostgreSQL (default: the test database at 127.0.0.1:5432).

1. Assembly of a turn in a 1,000-turn conversation: load (one transaction: owner check, summary, the
   newest history that can fit, the new user message stored) plus the window, p50/p95 over N turns, for
   the local model's 2,048-token window and for a 128k window (the whole history is loaded and counted).
2. The durable reply: committing a turn's reply before its last byte, per turn at c=1 and c=32 (group
   commit), against the queued write it replaced (which the client did not wait for).
3. The summary worker: summaries per second with an instant model (Keel's own work: lock, load, store).

    .venv/bin/python bench/context.py [--database-url URL] [-n 200]

A benchmark, not a test: results go into docs/context.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from sqlalchemy import text

from keel.context.conversations import ConversationStore
from keel.context.manager import ContextManager
from keel.context.summaries import Summarizer
from keel.db.engine import create_engine
from keel.db.migrate import upgrade
from keel.db.writer import WriteQueue
from keel.llm import ChatRequest
from keel.llm.tokens import TokenCounters
from keel.settings import ContextSettings, ModelConfig, Settings


def _ms(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


async def _tenant(engine: Any) -> uuid.UUID:
    async with engine.begin() as conn:
        return (
            await conn.execute(
                text("INSERT INTO tenants (name, tier) VALUES (:n, 'pro') RETURNING id"),
                {"n": f"bench-{uuid.uuid4().hex[:8]}"},
            )
        ).scalar_one()


async def _seed(
    store: ConversationStore, counters: TokenCounters, tenant: uuid.UUID, conversation: str, alias: str
) -> None:
    counter = counters.for_alias(alias)
    rows = []
    for turn in range(1000):
        for message in (
            {"role": "user", "content": f"Turn {turn}: tell me something about topic {turn} please."},
            {"role": "assistant", "content": f"Here is a short answer about topic {turn}, with a detail."},
        ):
            rows.append(
                store._row(
                    tenant,
                    conversation,
                    message,
                    f"seed-{turn}",
                    counter.count_message(message),
                    counter.name,
                )
            )
    async with store._engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO conversations (tenant_id, id, turns) VALUES (:t, :c, 1000)"),
            {"t": tenant, "c": conversation},
        )
        from keel.db.tables import conversation_messages

        await conn.execute(conversation_messages.insert(), rows)


async def assembly(
    manager: ContextManager,
    store: ConversationStore,
    counters: TokenCounters,
    tenant: uuid.UUID,
    n: int,
    alias: str,
) -> None:
    conversation = f"bench-{uuid.uuid4().hex[:8]}"
    await _seed(store, counters, tenant, conversation, alias)
    times = []
    for i in range(n):
        request = ChatRequest(
            model=alias, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=256
        )
        started = time.perf_counter()
        history = await manager.load(tenant, conversation, request, f"r{i}", "trim")
        messages, decision = manager.assemble(tenant, conversation, request, "trim", [], history, [])
        times.append(time.perf_counter() - started)
    print(
        f"assembly {alias:6} 1,000 turns: p50 {_ms(times, 0.5):.2f} ms  p95 {_ms(times, 0.95):.2f} ms  "
        f"(sent {len(messages)} messages, {decision.tokens} tokens, dropped {decision.dropped_turns} turns)"
    )


async def durable(store: ConversationStore, tenant: uuid.UUID, n: int) -> None:
    conversation = f"bench-{uuid.uuid4().hex[:8]}"
    async with store._engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO conversations (tenant_id, id) VALUES (:t, :c)"),
            {"t": tenant, "c": conversation},
        )
    reply = {"role": "assistant", "content": "An answer of a typical length, a sentence or two long."}
    for concurrency in (1, 32):
        times: list[float] = []
        commits_before = store._replies.commits

        async def writer(times: list[float] = times, turns: int = n // concurrency) -> None:
            for _ in range(turns):
                started = time.perf_counter()
                await store.commit_reply(tenant, conversation, reply, "bench", tokens=12, tokenizer="x")
                times.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        commits = store._replies.commits - commits_before
        print(
            f"durable reply c={concurrency:<2}: p50 {_ms(times, 0.5):.2f} ms  "
            f"p95 {_ms(times, 0.95):.2f} ms per turn, "
            f"{len(times) / elapsed:,.0f} turns/s, {len(times) / commits:.1f} turns per commit"
        )


async def summaries(
    engine: Any, store: ConversationStore, counters: TokenCounters, tenant: uuid.UUID, n: int
) -> None:
    summarizer = Summarizer(engine, counters, ContextSettings(summary_model="local"))

    async def instant(*args: Any) -> str:
        return "A summary of what was said."

    summarizer.bind(instant)
    conversations = []
    for _ in range(n):
        conversation = f"bench-{uuid.uuid4().hex[:8]}"
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO conversations (tenant_id, id) VALUES (:t, :c)"),
                {"t": tenant, "c": conversation},
            )
        for turn in range(20):
            await store.commit_reply(
                tenant,
                conversation,
                {"role": "user", "content": f"message {turn} " * 20},
                "b",
                tokens=45,
                tokenizer=counters.for_alias("local").name,
            )
        conversations.append(conversation)
    started = time.perf_counter()
    done = 0
    for conversation in conversations:
        done += await summarizer.summarize(tenant, conversation, "local", 600)
    elapsed = time.perf_counter() - started
    print(
        f"summaries (instant model): {done / elapsed:,.0f} per second "
        f"({elapsed / done * 1000:.1f} ms of Keel's work each)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    await upgrade(args.database_url)
    settings = Settings(
        database_url=args.database_url,
        models={"big": ModelConfig(provider="openai", base_url="http://127.0.0.1:9/v1", model="gpt-4o")},
    )
    engine = create_engine(args.database_url)
    counters = TokenCounters(settings)
    counters.preload()
    writes = WriteQueue(engine)
    store = ConversationStore(engine, writes)
    manager = ContextManager(store, counters, settings)
    tenant = await _tenant(engine)
    try:
        await assembly(manager, store, counters, tenant, args.n, "local")
        await assembly(manager, store, counters, tenant, args.n, "big")
        await durable(store, tenant, args.n * 5)
        await summaries(engine, store, counters, tenant, min(args.n, 50))
    finally:
        counters.close()
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
