"""The audit write queue under load: does anything get dropped, and what happens when PostgreSQL goes away?

Drives the real `AuditRecorder.record()` with realistic `CallOutcome`s (a system and a user message, a
reply, one or two attempts: about 1.5 KB per audit row) at a paced rate, through the real `WriteQueue`
(bound and batch size from the `Settings` defaults), into a real PostgreSQL, on uvloop as `keel serve`
runs. Each record is two rows: the audit record and the usage-ledger entry; the queue bound counts rows.

    .venv/bin/python bench/write_queue.py                  # 1,000 records/s for 60 s
    .venv/bin/python bench/write_queue.py --outage 30      # ... with PostgreSQL unreachable for 30 s

With `--outage N` the engine talks to PostgreSQL through a `keel.testing.TcpProxy`, which is cut N seconds
(every connection dropped, new ones refused) in the middle of the run and then restored.

The database is a scratch one created on postgresql://postgres@127.0.0.1:5432 and dropped afterwards,
unless --database-url names one. Keel's logs (one error line per dropped row) go to a temporary file and
are counted. A benchmark, not a test: results go into docs/observability.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
from sqlalchemy import Table, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db import WriteQueue, upgrade
from keel.db.engine import create_engine
from keel.db.tables import audit_requests, usage_ledger
from keel.db.writer import Row
from keel.llm import Attempt, ChatRequest, ChatResult, Usage
from keel.pipeline import CallOutcome, ChatCall
from keel.settings import Settings
from keel.telemetry.audit import AuditRecorder
from keel.telemetry.logging import JsonFormatter
from keel.telemetry.metrics import Metrics
from keel.telemetry.redact import Redactor
from keel.testing import TcpProxy

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
TICK = 0.005  # seconds between pacing steps: records due are offered in small bursts

SYSTEM = (
    "You are the support assistant of Northwind Outfitters. Answer briefly and politely, cite the order "
    "number when there is one, and never promise a refund: hand those to a human agent."
)
QUESTIONS = (
    "Hi, I ordered a pair of trail boots last Tuesday (order NW-48213) and the tracking page has said "
    "'label created' for five days now. Can you tell me whether it has actually shipped?",
    "The rain jacket I bought is a size too small. What is the exchange process, and do I need to keep "
    "the tags on? I already washed it once, does that matter?",
    "Do you ship to Norway, and if so how long does it take and are customs fees included in the price "
    "shown at checkout or charged on delivery?",
)
REPLY = (
    "Thanks for reaching out! Order NW-48213 was packed on Thursday and handed to the carrier this "
    "morning; the tracking page usually catches up within 24 hours. You should see it in transit by "
    "tomorrow, with delivery expected early next week. If it still shows 'label created' on Monday, "
    "reply here and a colleague will open a trace with the carrier."
)


class TimedWriteQueue(WriteQueue):
    """The real queue, timing each batch that commits (checkout, insert, commit)."""

    def __init__(self, engine: AsyncEngine, *, max_size: int, batch_size: int) -> None:
        super().__init__(engine, max_size=max_size, batch_size=batch_size)
        self.batch_seconds: list[float] = []

    async def _write(self, batch: list[tuple[Table, Row]]) -> None:
        began = time.perf_counter()
        await super()._write(batch)
        self.batch_seconds.append(time.perf_counter() - began)


def make_outcome(n: int, tenant: uuid.UUID) -> CallOutcome:
    """One chat call as the pipeline hands it to the recorders; every 20th needed a retry."""
    now = time.perf_counter()
    request = ChatRequest(
        model="support",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]},
        ],
        max_tokens=300,
        temperature=0.3,
        user=f"customer-{n % 500}",
    )
    call = ChatCall(
        f"req_{uuid.uuid4().hex}",
        tenant,
        request,
        conversation_id=f"conv-{n % 1000}",
        received=now - 0.9,
    )
    sent = replace(request)
    trace = sent.trace
    started = now - 0.8985
    if n % 20 == 0:
        trace.attempts.append(
            Attempt(
                "support",
                "support/1",
                "openai",
                "gpt-4o-mini",
                started,
                0.21,
                status=503,
                error_type="overloaded",
            )
        )
        started += 0.25
    trace.attempts.append(
        Attempt("support", "support/2", "openai", "gpt-4o-mini", started, now - started, 0.31, 200)
    )
    trace.answered_by, trace.deployment, trace.upstream_model = "support", "support/2", "gpt-4o-mini"
    result = ChatResult(text=REPLY, finish_reason="stop", usage=Usage(input_tokens=112, output_tokens=78))
    stages = {"prompt.resolve": 0.01, "context.load": 1.8, "retrieval": 0.02, "context.assemble": 0.03}
    return CallOutcome(
        call,
        sent,
        result,
        started=now - 0.9,
        model_started=now - 0.8985,
        first_event=now - 0.55,
        finished=now,
        stages=stages | {"model.call": 898.5},
        trace_id=uuid.uuid4().hex,
    )


def dropped_rows(metrics: Metrics) -> int:
    return int(metrics.registry.get_sample_value("keel_write_queue_dropped_total") or 0)


def percentile(values: list[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return math.nan
    return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]


@dataclass
class Result:
    offered: int = 0
    dropped_rows: int = 0
    max_depth: int = 0
    record_seconds: list[float] = field(default_factory=list)
    timeline: list[tuple[int, int, int, int]] = field(default_factory=list)  # second, offered, depth, dropped
    first_drop_at: float | None = None  # seconds into the run
    offer_seconds: float = 0.0
    drain_seconds: float = 0.0
    restored_at: float | None = None
    emptied_at: float | None = None  # when every row accepted before the restore was written


async def run(
    url: str,
    *,
    rate: float,
    seconds: float,
    outage: float,
    outage_at: float,
    proxy: TcpProxy | None,
    log_path: Path,
) -> None:
    settings = Settings(database_url=url)
    engine = create_engine(url)
    writes = TimedWriteQueue(engine, max_size=settings.write_queue_size, batch_size=settings.write_batch_size)
    metrics = Metrics()
    metrics.queue_depth.set_function(lambda: len(writes))
    recorder = AuditRecorder(writes, metrics, Redactor(settings.redact_patterns))
    tenant = uuid.uuid4()
    writes.start()
    print(
        f"rate {rate:g} records/s for {seconds:g} s; queue bound {settings.write_queue_size} rows, "
        f"batches of {settings.write_batch_size}"
        + (f"; PostgreSQL cut from t={outage_at:g} s for {outage:g} s" if outage else ""),
        flush=True,
    )
    result = Result()
    try:
        await offer(recorder, writes, metrics, tenant, result, rate, seconds, outage, outage_at, proxy)
        began = time.perf_counter()
        await writes.flush()
        result.drain_seconds = time.perf_counter() - began
        async with engine.connect() as connection:
            audits = await connection.scalar(
                select(func.count()).select_from(audit_requests).where(audit_requests.c.tenant_id == tenant)
            )
            ledger = await connection.scalar(
                select(func.count()).select_from(usage_ledger).where(usage_ledger.c.tenant_id == tenant)
            )
    finally:
        await writes.close(5)
        await engine.dispose()
    report(result, writes, settings, audits or 0, ledger or 0, outage, outage_at, log_path)


async def offer(
    recorder: AuditRecorder,
    writes: TimedWriteQueue,
    metrics: Metrics,
    tenant: uuid.UUID,
    result: Result,
    rate: float,
    seconds: float,
    outage: float,
    outage_at: float,
    proxy: TcpProxy | None,
) -> None:
    total = int(rate * seconds)
    start = time.perf_counter()
    second = 0
    cut = restored = False
    backlog = 0
    while result.offered < total:
        elapsed = time.perf_counter() - start
        if proxy is not None and not cut and elapsed >= outage_at:
            await asyncio.to_thread(proxy.cut)
            cut = True
        if proxy is not None and cut and not restored and elapsed >= outage_at + outage:
            await asyncio.to_thread(proxy.restore)
            restored = True
            result.restored_at = elapsed
            backlog = 2 * result.offered - dropped_rows(metrics)  # rows accepted so far
        due = min(total, int(elapsed * rate) + 1) - result.offered
        for _ in range(due):
            outcome = make_outcome(result.offered, tenant)
            began = time.perf_counter()
            recorder.record(outcome)
            result.record_seconds.append(time.perf_counter() - began)
            result.offered += 1
        depth = len(writes)
        result.max_depth = max(result.max_depth, depth)
        dropped = dropped_rows(metrics)
        if dropped and result.first_drop_at is None:
            result.first_drop_at = elapsed
        if restored and result.emptied_at is None and writes.written >= backlog:
            result.emptied_at = elapsed
        if elapsed >= second + 1:
            second += 1
            result.timeline.append((second, result.offered, depth, dropped))
        await asyncio.sleep(TICK)
    result.offer_seconds = time.perf_counter() - start
    result.dropped_rows = dropped_rows(metrics)


def report(
    result: Result,
    writes: TimedWriteQueue,
    settings: Settings,
    audits: int,
    ledger: int,
    outage: float,
    outage_at: float,
    log_path: Path,
) -> None:
    rows_offered = 2 * result.offered
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    drop_lines = sum('"write queue full' in line for line in lines)
    batches = writes.batch_seconds
    us = [s * 1e6 for s in result.record_seconds]
    print()
    if outage:
        print("  t (s)   offered   queue depth   dropped rows")
        for second, offered, depth, dropped in result.timeline:
            restore = outage_at + outage
            if second % 5 == 0 or outage_at <= second <= outage_at + 2 or restore <= second <= restore + 3:
                print(f"  {second:5d}   {offered:7d}   {depth:11d}   {dropped:12d}")
        print()
    took = result.offer_seconds
    print(f"records offered          {result.offered:>10,}  ({rows_offered:,} rows) in {took:.1f} s")
    print(f"rows written (in the db) {audits + ledger:>10,}  (audit {audits:,}, ledger {ledger:,})")
    print(f"rows dropped (counter)   {result.dropped_rows:>10,}  keel_write_queue_dropped_total")
    lost = rows_offered - result.dropped_rows - audits - ledger
    print(f"rows unaccounted for     {lost:>10,}  (offered - dropped - written)")
    print(f"max queue depth          {result.max_depth:>10,}  rows (bound {settings.write_queue_size:,})")
    print(
        f"batches committed        {len(batches):>10,}  p50 {percentile(batches, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(batches, 0.99) * 1000:.1f} ms, max {max(batches, default=0) * 1000:.1f} ms"
    )
    print(f"failed batch writes      {writes.failures:>10,}  (retried with backoff)")
    print(
        f"record() cost            p50 {percentile(us, 0.5):.0f} µs, p99 {percentile(us, 0.99):.0f} µs, "
        f"max {max(us, default=0):.0f} µs"
    )
    print(f"drain after the last put {result.drain_seconds:>10.2f} s")
    if outage:
        first = "never" if result.first_drop_at is None else f"t={result.first_drop_at:.1f} s"
        print(f"first drop               {first:>10}  (cut at t={outage_at:g} s)")
        if result.restored_at is not None:
            emptied = (
                f"{result.emptied_at - result.restored_at:.1f} s after the restore"
                if result.emptied_at is not None
                else "after the last put"
            )
            print(f"backlog written          {emptied} (every row accepted before the restore)")
    print(f"log lines                {len(lines):>10,}  ({drop_lines:,} 'write queue full' errors)")
    print(f"peak RSS                 {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>10.0f} MiB")


@contextlib.asynccontextmanager
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


async def main_async(args: argparse.Namespace, log_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        url = args.database_url or await stack.enter_async_context(scratch_database(DEFAULT_PG))
        await upgrade(url)
        proxy = None
        if args.outage:
            parsed = make_url(url)
            proxy = stack.enter_context(TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432))
            url = parsed.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
        outage_at = (
            args.outage_at if args.outage_at is not None else max(0.0, (args.seconds - args.outage) / 2)
        )
        await run(
            url,
            rate=args.rate,
            seconds=args.seconds,
            outage=args.outage,
            outage_at=outage_at,
            proxy=proxy,
            log_path=log_path,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="records per second (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to offer (default 60)")
    parser.add_argument("--outage", type=float, default=0.0, help="cut PostgreSQL for this many seconds")
    parser.add_argument("--outage-at", type=float, default=None, help="when to cut (default: mid-run)")
    parser.add_argument("--database-url", default=None, help="default: a scratch database, dropped after")
    parser.add_argument("--log-file", type=Path, default=None, help="keep Keel's log lines here")
    args = parser.parse_args()

    log_path = args.log_file or Path(tempfile.mkstemp(prefix="keel-bench-", suffix=".log")[1])
    handler = logging.FileHandler(log_path)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(args, log_path))
    else:
        uvloop.run(main_async(args, log_path))
    finally:
        handler.close()
        if args.log_file is None:
            os.unlink(log_path)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
