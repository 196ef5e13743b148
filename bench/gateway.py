"""What Keel costs in front of a model: requests/s, and the latency it adds at p50 and p99.

Three processes, so the numbers are honest: a `FakeUpstream` (`python -m keel.testing.fake_upstream`), a
real `keel serve` (uvloop + httptools, auth and rate limits on, as users run it) whose one model alias
points at the fake, and this process, the load generator (aiohttp, a pre-opened connection pool). Each
(mode, concurrency) cell runs the same requests straight at the fake and then through Keel; "added" is
Keel's latency minus the direct one at the same percentile. Warm-up requests are not counted.

    .venv/bin/python bench/gateway.py                     # streaming and not, concurrency 1 and 32
    .venv/bin/python bench/gateway.py -n 5000 -c 1,8,32 --stream --rounds 3 --log-levels INFO,WARNING
    .venv/bin/python bench/gateway.py --keel-env KEEL_AUDIT_ENABLED=false   # any Keel setting

A benchmark, not a test: results go into docs/performance.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
import asyncpg
import orjson

HOST = "127.0.0.1"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
UPSTREAM_MODEL = "fake-gpt"
MESSAGES = [{"role": "user", "content": "Say hello."}]
MAX_REQUESTS = 1_000_000
REQUEST_TIMEOUT = 30.0


class BenchError(Exception):
    pass


# -- measurement ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One target at one (mode, concurrency): latencies in seconds."""

    latencies: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def p(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(self.latencies if values is None else values)
        if not data:
            return math.nan
        return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]
    model: str

    def body(self, stream: bool) -> bytes:
        payload: dict[str, object] = {"model": self.model, "messages": MESSAGES, "stream": stream}
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return orjson.dumps(payload)


async def drive(
    target: Target, *, stream: bool, n: int, concurrency: int, warmup: int, limit_s: float
) -> Run:
    """`warmup` requests (which also open the pool's connections), then `n` timed ones."""
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        body = target.body(stream)
        await _load(session, target, body, stream, max(warmup, concurrency), concurrency, Run(), limit_s)
        run = Run()
        started = time.perf_counter()
        await _load(session, target, body, stream, n, concurrency, run, limit_s)
        run.elapsed = time.perf_counter() - started
        return run


async def _load(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    stream: bool,
    n: int,
    concurrency: int,
    run: Run,
    limit_s: float,
) -> None:
    counter = itertools.count()
    deadline = time.perf_counter() + limit_s
    perf_counter = time.perf_counter

    async def worker() -> None:
        while next(counter) < n:
            if perf_counter() > deadline:
                run.truncated = True
                return
            started = perf_counter()
            first = 0.0
            async with session.post(target.url, data=body, headers=target.headers) as response:
                if stream:
                    tail = b""
                    async for chunk in response.content.iter_any():
                        if not first:
                            first = perf_counter()
                        tail = (tail + chunk)[-16:]
                    ok = response.status == 200 and tail.endswith(b"data: [DONE]\n\n")
                else:
                    payload = await response.read()
                    ok = response.status == 200 and b'"choices"' in payload
            finished = perf_counter()
            if not ok:
                run.errors.append(f"{target.name}: HTTP {response.status}")
                if len(run.errors) > 10:
                    raise BenchError("; ".join(run.errors[:3]))
                continue
            run.latencies.append(finished - started)
            if first:
                run.first_bytes.append(first - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# -- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Every process the benchmark starts, each in its own session; all stopped on the way out."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], *, env: dict[str, str], cwd: Path, log: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self._running[:]):
            self.stop(proc)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise BenchError(f"{proc.args!r} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{url} not ready after {timeout:.0f} s; see {log_path}")


@contextlib.contextmanager
def scratch_database(url: str | None) -> Iterator[str | None]:
    """The given URL; else a scratch database on the machine's PostgreSQL, dropped afterwards; else None
    (Keel starts its embedded PostgreSQL)."""
    if url is not None:
        yield url
        return
    name = f"keel_bench_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_admin(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"# no PostgreSQL at {DEFAULT_PG} ({exc}); Keel uses its embedded one", file=sys.stderr)
        yield None
        return
    try:
        yield f"{DEFAULT_PG}/{name}"
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{DEFAULT_PG}/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def keel_env(
    work: Path, port: int, fake_port: int, database_url: str | None, log_level: str, extra: dict[str, str]
) -> dict[str, str]:
    config = work / "keel.toml"
    config.write_text(
        'default_model = "fake"\n\n'
        "[models.fake]\n"
        'provider = "openai"\n'
        f'model = "{UPSTREAM_MODEL}"\n'
        f'base_url = "http://{HOST}:{fake_port}/v1"\n'
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEEL_")}
    env |= {
        "KEEL_CONFIG": str(config),
        "KEEL_DATA_DIR": str(work / "data"),
        "KEEL_HOST": HOST,
        "KEEL_PORT": str(port),
        "KEEL_LOG_LEVEL": log_level,
        "KEEL_SHUTDOWN_DRAIN_SECONDS": "5",
    }
    if database_url is not None:
        env["KEEL_DATABASE_URL"] = database_url
    return env | extra


def api_key(command: list[str], env: dict[str, str], work: Path) -> str:
    """The admin key Keel wrote on first start; for a database bootstrapped earlier, a new key of the
    default tenant."""
    written = work / "data" / "admin.key"
    if written.is_file():
        return written.read_text().strip()
    made = subprocess.run(
        [*command, "keys", "create", "--tenant", "default", "--label", "bench"],
        env=env,
        cwd=work,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if made.returncode != 0:
        raise BenchError(f"could not create an API key: {made.stderr.decode(errors='replace')[-2000:]}")
    return made.stdout.decode().strip().splitlines()[-1]


# -- report -----------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


HEADER = (
    "| Keel config | mode | c | direct req/s | direct p50 | direct p99 | Keel req/s | Keel p50 | Keel p99 "
    "| added p50 | added p99 | TTFB p50 direct / Keel |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def row(config: str, mode: str, c: int, direct: Run, keel: Run) -> str:
    ttfb = "–"
    if direct.first_bytes and keel.first_bytes:
        ttfb = f"{ms(direct.p(0.5, direct.first_bytes))} / {ms(keel.p(0.5, keel.first_bytes))}"
    cells = [
        config,
        mode,
        str(c),
        f"{direct.rps:,.0f}",
        ms(direct.p(0.5)),
        ms(direct.p(0.99)),
        f"{keel.rps:,.0f}",
        ms(keel.p(0.5)),
        ms(keel.p(0.99)),
        ms(keel.p(0.5) - direct.p(0.5)),
        ms(keel.p(0.99) - direct.p(0.99)),
        ttfb,
    ]
    note = " (time limit hit)" if direct.truncated or keel.truncated else ""
    return "| " + " | ".join(cells) + " |" + note


def best(runs: list[Run]) -> Run:
    """Of repeated rounds, the fastest: on a shared machine the slower ones measure the neighbours."""
    return max(runs, key=lambda run: run.rps)


def unwind_on_sigterm() -> None:
    """Outside the event loop, SIGTERM unwinds like Ctrl-C, so `finally` stops what was started."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "-n", "--requests", type=int, default=3000, help="timed requests per cell (default 3000)"
    )
    parser.add_argument("-c", "--concurrency", default="1,32", help="comma-separated list (default 1,32)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--stream", dest="modes", action="store_const", const=["stream"], help="streaming only"
    )
    modes.add_argument(
        "--no-stream", dest="modes", action="store_const", const=["json"], help="non-streaming only"
    )
    parser.add_argument(
        "--warmup", type=int, default=300, help="untimed requests before each run (default 300)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat each cell, keep the fastest (default 1)"
    )
    parser.add_argument(
        "--log-levels",
        default="INFO",
        help="Keel's KEEL_LOG_LEVEL, one Keel per level (default INFO; try INFO,WARNING)",
    )
    parser.add_argument(
        "--keel-env",
        action="append",
        default=[],
        metavar="KEEL_X=VALUE",
        help="extra setting for Keel, e.g. KEEL_AUDIT_ENABLED=false (repeatable)",
    )
    parser.add_argument("--database-url", default=None, help=f"default: a scratch database on {DEFAULT_PG}")
    parser.add_argument(
        "--time-limit", type=float, default=120.0, help="seconds per run before it stops early"
    )
    args = parser.parse_args(argv)
    args.modes = args.modes or ["json", "stream"]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.log_levels = [level.strip().upper() for level in args.log_levels.split(",") if level.strip()]
    extra = [item.partition("=") for item in args.keel_env]
    if not all(key.startswith("KEEL_") and sep for key, sep, _ in extra):
        parser.error("--keel-env takes KEEL_NAME=VALUE")
    args.keel_env = {key: value for key, _, value in extra}
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"-n must be 1..{MAX_REQUESTS}")
    if not args.concurrency or not all(1 <= c <= 1000 for c in args.concurrency):
        parser.error("-c: concurrencies must be 1..1000")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    processes = Processes()
    rows: list[str] = []
    try:
        with scratch_database(args.database_url) as database_url:
            fake_port = free_port()
            fake_log_path = work / "fake.log"
            with fake_log_path.open("wb") as fake_log:
                fake = processes.start(
                    [sys.executable, "-m", "keel.testing.fake_upstream", "--port", str(fake_port)],
                    env=dict(os.environ),
                    cwd=work,
                    log=fake_log,
                )
            wait_ready(f"http://{HOST}:{fake_port}/v1/models", fake, fake_log_path, 30)
            direct = Target("direct", f"http://{HOST}:{fake_port}/v1/chat/completions", {}, UPSTREAM_MODEL)
            for log_level in args.log_levels:
                rows += bench_keel(args, processes, work, fake_port, database_url, log_level, direct)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(HEADER)
    print("\n".join(rows))
    print(
        f"\n{args.requests} timed requests per cell after {args.warmup} warm-up,"
        f" best of {args.rounds} round(s); latencies in ms; {os.cpu_count()} CPUs,"
        f" load average {os.getloadavg()[0]:.2f} at the end."
    )
    return 0


def bench_keel(
    args: argparse.Namespace,
    processes: Processes,
    work: Path,
    fake_port: int,
    database_url: str | None,
    log_level: str,
    direct: Target,
) -> list[str]:
    port = free_port()
    log_path = work / f"keel-{log_level.lower()}.log"
    keel_bin = Path(sys.executable).with_name("keel")
    command = (
        [str(keel_bin)] if keel_bin.exists() else [sys.executable, "-c", "from keel.cli import main; main()"]
    )
    env = keel_env(work, port, fake_port, database_url, log_level, args.keel_env)
    config = " ".join([f"log {log_level}", *(f"{k}={v}" for k, v in args.keel_env.items())])
    with log_path.open("wb") as log:
        keel = processes.start([*command, "serve"], env=env, cwd=work, log=log)
    try:
        wait_ready(f"http://{HOST}:{port}/healthz", keel, log_path, 180)
        key = api_key(command, env, work)
        through = Target(
            "keel",
            f"http://{HOST}:{port}/v1/chat/completions",
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            "fake",
        )
        rows = []
        for mode in args.modes:
            for c in args.concurrency:
                runs = asyncio.run(measure(args, direct, through, stream=mode == "stream", concurrency=c))
                line = row(config, mode, c, best(runs[0]), best(runs[1]))
                print(line, file=sys.stderr, flush=True)  # progress; the table goes to stdout at the end
                rows.append(line)
        return rows
    finally:
        processes.stop(keel)


async def measure(
    args: argparse.Namespace, direct: Target, through: Target, *, stream: bool, concurrency: int
) -> tuple[list[Run], list[Run]]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # In the loop, SIGTERM cancels the run (as asyncio.run does for Ctrl-C) rather than raising inside
    # whatever callback is running.
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await _measure(args, direct, through, stream=stream, concurrency=concurrency)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        unwind_on_sigterm()


async def _measure(
    args: argparse.Namespace, direct: Target, through: Target, *, stream: bool, concurrency: int
) -> tuple[list[Run], list[Run]]:
    directs: list[Run] = []
    throughs: list[Run] = []
    for _ in range(args.rounds):  # alternated, so a burst of load elsewhere hits both alike
        for target, runs in ((direct, directs), (through, throughs)):
            run = await drive(
                target,
                stream=stream,
                n=args.requests,
                concurrency=concurrency,
                warmup=args.warmup,
                limit_s=args.time_limit,
            )
            if run.errors:
                raise BenchError(f"{len(run.errors)} failed requests: {run.errors[0]}")
            runs.append(run)
    return directs, throughs


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        pass
    else:
        uvloop.install()
    sys.exit(main())
