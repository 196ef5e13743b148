"""The embedded PostgreSQL 18 + pgvector: starts with no URL, is shared, stops, survives a crash."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from keel.db import Database
from keel.settings import Settings

OPEN_AND_MAYBE_CRASH = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from keel.db import Database
    from keel.settings import Settings

    async def main():
        database = Database(Settings(data_dir=Path(sys.argv[1])))
        await database.open()
        pid = int((Path(sys.argv[1]) / "pg" / "postmaster.pid").read_text().split()[0])
        print(pid, flush=True)
        if sys.argv[2] == "crash":  # the machine dies: postgres and Keel killed, no clean-up at all
            os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        await database.close()

    asyncio.run(main())
    """
)


def _run(data_dir: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", OPEN_AND_MAYBE_CRASH, str(data_dir), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _postmaster_pid(data_dir: Path) -> int | None:
    pidfile = data_dir / "pg" / "postmaster.pid"
    return int(pidfile.read_text().split()[0]) if pidfile.exists() else None


def test_embedded_server_has_pgvector_and_stops_on_close(tmp_path: Path) -> None:
    async def go() -> tuple[str, str | None]:
        database = Database(Settings(data_dir=tmp_path, database_url=None))
        engine = await database.open()
        try:
            async with engine.begin() as conn:
                version = (await conn.execute(text("SHOW server_version"))).scalar_one()
                await conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
                vector = (await conn.execute(text("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector"))).scalar()
                tables = (await conn.execute(text("SELECT to_regclass('api_keys')"))).scalar()
        finally:
            await database.close()
        assert vector == 1.0
        return version, tables

    version, tables = asyncio.run(go())
    assert version.startswith("18.")
    assert tables == "api_keys"  # migrations ran
    assert _postmaster_pid(tmp_path) is None  # stopped cleanly


def test_a_second_process_joins_the_running_server(tmp_path: Path) -> None:
    async def go() -> None:
        database = Database(Settings(data_dir=tmp_path, database_url=None))
        await database.open()
        try:
            pid = _postmaster_pid(tmp_path)
            other = await asyncio.to_thread(_run, tmp_path, "ok")
            assert other.returncode == 0, other.stderr
            assert int(other.stdout.split()[0]) == pid  # the same server, not a second one
            assert _postmaster_pid(tmp_path) == pid  # and the other process left it running for us
        finally:
            await database.close()

    asyncio.run(go())
    assert _postmaster_pid(tmp_path) is None


def test_comes_back_after_a_crash_without_manual_steps(tmp_path: Path) -> None:
    crashed = _run(tmp_path, "crash")
    assert crashed.returncode == -signal.SIGKILL
    dead_pid = int(crashed.stdout.split()[0])
    assert (tmp_path / "pg" / "postmaster.pid").exists()  # stale state left behind
    recovered = _run(tmp_path, "ok")
    assert recovered.returncode == 0, recovered.stderr
    assert int(recovered.stdout.split()[0]) != dead_pid
    assert _postmaster_pid(tmp_path) is None


@pytest.fixture(autouse=True)
def _no_stray_servers(tmp_path: Path) -> object:
    yield None
    pid = _postmaster_pid(tmp_path)
    if pid is not None:  # never leave a server behind, even when a test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
