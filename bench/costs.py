"""The month report over millions of ledger rows: does `/v1/usage` (keel.costs.UsageReports) answer in
well under a second, and what does the rollup trigger cost the write path?

Loads ROWS cost-ledger rows for one tenant spread over 30 UTC days (plus the same again for another
tenant, so the report has to pick its tenant out) with binary COPY in batches of 10,000, as the write queue
writes them: every batch fires the statement trigger that keeps `cost_daily`. Shape of the traffic:
USERS end users, each always on the same key (one of 20) and prompt (one of 10), calling one of 5 aliases
at random. Then times the month's report by each grouping (median of 5 runs, after one warm-up).

    .venv/bin/python bench/costs.py                  # 2,000,000 rows per tenant
    .venv/bin/python bench/costs.py --rows 200000

The database is a scratch one on postgresql://postgres@127.0.0.1:5432, dropped afterwards. A benchmark,
not a test: results go into docs/costs.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg

from keel.costs.reports import GROUPS, UsageReports
from keel.db import upgrade
from keel.db.engine import create_engine

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
BATCH = 10_000
COLUMNS = (
    "created_at",
    "tenant_id",
    "key_id",
    "end_user",
    "kind",
    "alias",
    "provider",
    "upstream_model",
    "attempt",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "estimated",
    "cost_micros",
    "price_source",
    "prompt_name",
    "prompt_version",
    "request_id",
)


@asynccontextmanager
async def scratch_database(admin_url: str) -> AsyncIterator[str]:
    name = f"keel_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(f"{admin_url}/postgres", timeout=5)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield f"{admin_url}/{name}"
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def rows(tenant: uuid.UUID, count: int, users: int, start: datetime) -> list[tuple[object, ...]]:
    keys = [uuid.uuid4() for _ in range(20)]
    aliases = ["gpt-4o", "gpt-4o-mini", "claude", "haiku", "local"]
    rng = random.Random(7)
    made = []
    for i in range(count):
        user = rng.randrange(users)
        at = start + timedelta(seconds=rng.randrange(30 * 86_400))
        made.append(
            (
                at,
                tenant,
                keys[user % 20],
                f"user-{user}",
                "chat",
                rng.choice(aliases),
                "openai",
                "gpt-4o",
                1,
                1000,
                200,
                100,
                False,
                3250,
                "genai-prices@0.2.5",
                f"prompt-{user % 10}",
                1,
                f"req-{i}",
            )
        )
    return made


async def load(url: str, tenant: uuid.UUID, count: int, users: int, start: datetime) -> float:
    data = rows(tenant, count, users, start)
    conn = await asyncpg.connect(url)
    try:
        began = time.perf_counter()
        for offset in range(0, len(data), BATCH):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "cost_ledger", records=data[offset : offset + BATCH], columns=COLUMNS
                )
        return time.perf_counter() - began
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> None:
    async with AsyncExitStack() as stack:
        url = args.database_url or await stack.enter_async_context(scratch_database(DEFAULT_PG))
        await upgrade(url)
        start = datetime(2025, 6, 1, tzinfo=UTC)
        tenant, other = uuid.uuid4(), uuid.uuid4()
        seconds = await load(url, tenant, args.rows, args.users, start)
        print(
            f"loaded {args.rows:,} ledger rows in {seconds:.1f} s "
            f"({args.rows / seconds:,.0f} rows/s, trigger on)"
        )
        await load(url, other, args.rows, args.users, start)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE cost_daily")
            daily = await conn.fetchval("SELECT count(*) FROM cost_daily WHERE tenant_id = $1", tenant)
            total = await conn.fetchval(
                "SELECT sum(cost_micros) FROM cost_ledger WHERE tenant_id = $1", tenant
            )
            began = time.perf_counter()
            await conn.fetchval("SELECT sum(cost_micros) FROM cost_ledger WHERE tenant_id = $1", tenant)
            raw = time.perf_counter() - began
        finally:
            await conn.close()
        print(
            f"rollup rows for the tenant's month: {daily:,}; "
            f"summing the raw ledger instead: {raw * 1000:.0f} ms"
        )
        engine = create_engine(url, pool_size=1)
        stack.push_async_callback(engine.dispose)
        reports = UsageReports(engine)
        first, end = start.date(), (start + timedelta(days=30)).date()
        for group in GROUPS:
            await reports.report(tenant, first, end, group)  # warm-up
            times = []
            for _ in range(5):
                began = time.perf_counter()
                lines = await reports.report(tenant, first, end, group)
                times.append(time.perf_counter() - began)
            summed = sum(line.cost_micros for line in lines)
            assert summed == total, (group, summed, total)
            print(
                f"month report by {group:<6}: {statistics.median(times) * 1000:7.1f} ms median, "
                f"{len(lines):,} lines"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="ledger rows per tenant")
    parser.add_argument("--users", type=int, default=1_000, help="distinct end users")
    parser.add_argument("--database-url", default=None, help="default: a scratch database, dropped after")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
