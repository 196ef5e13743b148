"""The prompt registry's numbers: how fast a label move reaches another Keel process, what a prompt adds to
a request once cached, and how close sticky assignment comes to the weights.

Two real Keel servers (in this process, each with its own event loop thread) on one fresh PostgreSQL
database, a `FakeUpstream`, httpx as the client.

    .venv/bin/python bench/prompts.py                  # 50 label moves, 300 requests per mode
    .venv/bin/python bench/prompts.py --moves 200 --requests 1000

A benchmark, not a test: results go into docs/prompts.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from keel.db.engine import create_engine
from keel.llm import ChatRequest
from keel.pipeline import ChatCall
from keel.prompts.cache import PromptCache
from keel.prompts.experiments import Experiment, allocate
from keel.prompts.resolver import RegistryResolver
from keel.prompts.store import PromptStore
from keel.settings import ModelConfig, Settings
from keel.testing import FakeUpstream
from keel.testing.server import KeelServer

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
NAME = "bench-bot"
PROBE = "bench-probe"


async def _admin_sql(url: str, sql: str) -> None:
    conn = await asyncpg.connect(f"{url}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _default_tenant(url: str) -> uuid.UUID:
    conn = await asyncpg.connect(url)
    try:
        found: uuid.UUID = await conn.fetchval("SELECT id FROM tenants WHERE name = 'default'")
        return found
    finally:
        await conn.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _served(chat: httpx.Client, prompt: bool) -> str:
    body: dict[str, Any] = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    if prompt:
        body["prompt"] = {"name": NAME, "variables": {"company": "Acme"}}
    response = chat.post("/chat/completions", json=body)
    response.raise_for_status()
    return str(response.status_code)


def propagation(admin: httpx.Client, chat: httpx.Client, moves: int) -> list[float]:
    """Seconds from a label move's response (committed) on server A to server B serving that version.

    Each version needs its own variable (`a` in v1, `b` in v2) and the probe sends none, so B answers a
    400 naming the variable of the version it resolved: from the cache, without a model call, in about a
    millisecond. That is the resolution of this measurement.
    """
    took: list[float] = []
    probe = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "prompt": {"name": PROBE}}
    for n in range(moves):
        version = 1 + (n + 1) % 2
        admin.put(f"/prompts/{PROBE}/labels/production", json={"version": version}).raise_for_status()
        moved = time.perf_counter()
        wanted = f"prompt.variables.{'ab'[version - 1]}"
        while chat.post("/chat/completions", json=probe).json()["error"]["param"] != wanted:
            pass
        took.append(time.perf_counter() - moved)
    return took


def request_latency(chat: httpx.Client, requests: int, prompt: bool) -> list[float]:
    for _ in range(20):  # warm-up: connections, caches
        _served(chat, prompt)
    latencies = []
    for _ in range(requests):
        began = time.perf_counter()
        _served(chat, prompt)
        latencies.append(time.perf_counter() - began)
    return latencies


async def resolve_cost(url: str, tenant_id: uuid.UUID, calls: int) -> tuple[float, float]:
    """Seconds per `resolve()` in-process with a warm cache: (no prompt, a prompt with one variable)."""
    engine = create_engine(url, pool_size=1)
    try:
        cache = PromptCache()
        cache.enabled = True  # as when the listener is connected
        resolver = RegistryResolver(PromptStore(engine), cache, max_rendered_chars=100_000)
        request = ChatRequest(model="fake", messages=[{"role": "user", "content": "hi"}])
        plain = ChatCall("bench", tenant_id, request)
        named = ChatCall("bench", tenant_id, request, prompt={"name": NAME, "variables": {"company": "Acme"}})
        await resolver.resolve(named)  # warm
        costs = []
        for call in (plain, named):
            began = time.perf_counter()
            for _ in range(calls):
                await resolver.resolve(call)
            costs.append((time.perf_counter() - began) / calls)
        return costs[0], costs[1]
    finally:
        await engine.dispose()


def split_accuracy(weights: dict[int, int], units: int = 10_000) -> float:
    """The largest gap, in percentage points, between observed shares and weights."""
    experiment = Experiment(uuid.uuid4(), "experiment", "user", "running", tuple(allocate(weights)), 1, None)
    seen = Counter(experiment.assign(f"user:{n}") for n in range(units))
    return max(abs(seen[v] * 100 / units - w) for v, w in weights.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server URL, without a database")
    parser.add_argument("--moves", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    database = f"keel_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin_sql(args.pg, f"CREATE DATABASE {database}"))
    try:
        with FakeUpstream(record=True) as fake, tempfile.TemporaryDirectory() as data:
            settings = Settings(
                database_url=f"{args.pg}/{database}",
                data_dir=Path(data),
                log_level="WARNING",
                models={
                    "fake": ModelConfig(provider="openai", base_url=fake.openai_base_url, model="fake-gpt")
                },
                default_model="fake",
                rate_limits_enabled=False,
                audit_enabled=False,
            )
            with KeelServer(settings) as first, KeelServer(settings) as second:
                key = (Path(data) / "admin.key").read_text().strip()
                headers = {"Authorization": f"Bearer {key}"}
                with (
                    httpx.Client(base_url=first.base_url, headers=headers) as admin,
                    httpx.Client(base_url=second.base_url, headers=headers) as chat,
                ):
                    for number in (1, 2):
                        spec = {
                            "name": NAME,
                            "variables": {"company": {"type": "string"}},
                            "template": f"v{number} You are the assistant of {{{{ company }}}}.",
                        }
                        admin.post("/prompts", json=spec).raise_for_status()
                    admin.put(f"/prompts/{NAME}/labels/production", json={"version": 1}).raise_for_status()
                    for variable in ("a", "b"):
                        probe = {
                            "name": PROBE,
                            "variables": {variable: {}},
                            "template": f"{{{{ {variable} }}}}",
                        }
                        admin.post("/prompts", json=probe).raise_for_status()
                    admin.put(f"/prompts/{PROBE}/labels/production", json={"version": 1}).raise_for_status()
                    took = propagation(admin, chat, args.moves)
                    plain = request_latency(chat, args.requests, prompt=False)
                    prompted = request_latency(chat, args.requests, prompt=True)
                tenant_id = asyncio.run(_default_tenant(f"{args.pg}/{database}"))
                none_cost, prompt_cost = asyncio.run(resolve_cost(f"{args.pg}/{database}", tenant_id, 20_000))
    finally:
        asyncio.run(_admin_sql(args.pg, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))

    print(f"label move -> other process serves it ({len(took)} moves):")
    print(f"  p50 {_ms(statistics.median(took))}  p99 {_ms(_percentile(took, 0.99))}  max {_ms(max(took))}")
    print(f"request latency through Keel, sequential ({args.requests} each):")
    for title, values in (("no prompt", plain), ("cached prompt", prompted)):
        print(f"  {title:14} p50 {_ms(statistics.median(values))}  p99 {_ms(_percentile(values, 0.99))}")
    print("resolve() in-process, warm cache (20,000 calls each):")
    print(f"  no prompt {none_cost * 1e6:.2f} µs   cached prompt, rendered {prompt_cost * 1e6:.2f} µs")
    print("split over 10,000 units, largest gap from the weights:")
    for weights in ({1: 50, 2: 50}, {1: 95, 2: 5}, {1: 20, 2: 30, 3: 50}):
        print(f"  {weights}: {split_accuracy(weights):.2f} points")


if __name__ == "__main__":
    main()
