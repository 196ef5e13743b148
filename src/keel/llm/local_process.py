"""The local model's worker process, seen from the gateway: start it, know when it is up, restart it.

One worker per local alias (`keel.llm.local_server`). When it dies (a crash in llama.cpp, an OOM kill) the
alias is down until it is back: its requests get a 503 (or fall back), every other alias keeps serving,
and the worker is started again with exponential backoff. A model that cannot load at all (no
llama-cpp-python, no model file) is said once, with the fix, and not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import time
from collections import deque

import orjson

from keel.llm.local_engine import CannotLoad, preflight
from keel.settings import LocalModelSettings, ModelConfig

log = logging.getLogger(__name__)

EXIT_CANNOT_LOAD = 3  # keel.llm.local_server's status for "starting again will not help"
BACKOFF_FIRST = 0.5  # seconds before the first restart; doubled per failure up to local.restart_backoff_max
STABLE_SECONDS = 60.0  # a worker that lived this long starts the next backoff from the beginning
CRASH_SIGNALS = {signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT}
REBUILD_HINT = (
    "if it happens on every start, llama-cpp-python was built for another CPU: rebuild it portable with "
    "`make clean run` (the Makefile builds it without -march=native)"
)


class WorkerProcess:
    def __init__(self, alias: str, config: ModelConfig, local: LocalModelSettings) -> None:
        self.alias = alias
        self._config = config
        self._local = local
        self.token = secrets.token_urlsafe(32)
        self.port: int | None = None  # set while the worker is up
        self.down_reason = "the local model was not started"
        self.closing = False
        self.starts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._settled: asyncio.Future[None] | None = None  # the first start's outcome, up or not

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.port is not None else None

    async def start(self) -> None:
        """Start the worker and wait until it is up or has said why it cannot be (bounded by start_timeout);
        it goes on being supervised either way."""
        try:
            preflight(self._config, self._local)
        except CannotLoad as exc:  # nothing a worker could change: say so without starting one
            self._cannot_load(str(exc))
            return
        self.down_reason = "the local model is starting"
        self._settled = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"keel-local-{self.alias}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._settled), self._local.start_timeout)

    async def aclose(self) -> None:
        self.closing = True
        self.port = None
        self.down_reason = "the local model is shut down"
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()  # a model worker keeps no state: no reason to wait for it
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._proc is not None and self._proc.returncode is None:
            await self._proc.wait()

    def _cannot_load(self, reason: str) -> None:
        self.down_reason = reason
        log.error("local model %r is down: %s", self.alias, reason)
        self._settle()

    def _settle(self) -> None:
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    async def _supervise(self) -> None:
        delay = BACKOFF_FIRST
        first = True
        while not self.closing:
            began = time.monotonic()
            reason, permanent = await self._run_once()
            if self.closing:
                return
            if permanent:
                self._cannot_load(reason)
                return
            if time.monotonic() - began > STABLE_SECONDS:
                delay = BACKOFF_FIRST
            self.down_reason = f"{reason}; restarting"
            level = logging.ERROR if first else logging.WARNING
            log.log(level, "local model %r is down: %s; restarting in %.1f s", self.alias, reason, delay)
            first = False
            self._settle()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._local.restart_backoff_max)

    async def _run_once(self) -> tuple[str, bool]:
        """Run one worker until it exits: why it stopped, and whether starting again is pointless."""
        self.starts += 1
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "keel.llm.local_server",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C at the terminal is the gateway's to handle, not the worker's
        )
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        tail: deque[str] = deque(maxlen=20)
        reader = asyncio.create_task(self._read_stderr(proc.stderr, tail))
        try:
            spec = {
                "alias": self.alias,
                "config": self._config.model_dump(mode="json"),
                "local": self._local.model_dump(mode="json"),
                "token": self.token,
            }
            proc.stdin.write(orjson.dumps(spec) + b"\n")  # stdin stays open: its end tells the worker we died
            said = await self._first_word(proc)
            if "ready" in said:
                self.port = int(str(said["ready"]))
                log.info("local model %r is up (worker pid %d, port %d)", self.alias, proc.pid, self.port)
                self._settle()
            status = await proc.wait()
        finally:
            self.port = None
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            await reader
        if "error" in said:
            return str(said["error"]), status == EXIT_CANNOT_LOAD
        if "timeout" in said:
            return f"the worker did not load the model within {self._local.start_timeout:g} s", False
        return describe_exit(status, "ready" in said, tail), False

    async def _first_word(self, proc: asyncio.subprocess.Process) -> dict[str, object]:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self._local.start_timeout)
        except TimeoutError:
            proc.kill()
            return {"timeout": True}
        if not line:
            return {}
        try:
            said = orjson.loads(line)
        except orjson.JSONDecodeError:
            return {}
        return said if isinstance(said, dict) else {}

    async def _read_stderr(self, stream: asyncio.StreamReader, tail: deque[str]) -> None:
        """The worker's own log lines join the gateway's; the last ones explain a crash."""
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
                log.info("local model %r worker: %s", self.alias, line)


def describe_exit(status: int, was_up: bool, tail: deque[str]) -> str:
    when = "while answering" if was_up else "while loading"
    if status < 0:
        number = -status
        try:
            name = signal.Signals(number).name
        except ValueError:  # a number with no name here
            name = str(number)
        what = f"the worker process was killed by {name} {when}"
        if number in CRASH_SIGNALS:
            what += f" (a crash in llama.cpp; {REBUILD_HINT})"
    else:
        what = f"the worker process exited with status {status} {when}"
    last = next((line for line in reversed(tail) if line.strip()), None)
    return f"{what}; its last words: {last}" if last else what
