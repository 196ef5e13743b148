"""Run a real `keel serve` as its own OS process: for tests that need a second process or a real signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx


class KeelProcess:
    """`keel serve` on a free port with `env` (KEEL_* settings) added; its log goes to DATA_DIR/serve.log."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.log_path = data_dir / "serve.log"
        self._env = {**os.environ, "KEEL_DATA_DIR": str(data_dir), "KEEL_PORT": str(self.port), **env}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> KeelProcess:
        with self.log_path.open("w") as log:  # the child keeps its own copy of the descriptor
            self._process = subprocess.Popen(
                [sys.executable, "-m", "keel", "serve"], env=self._env, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self._process.poll() is not None:
                raise RuntimeError(f"keel serve exited:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("keel serve did not start in time")
            time.sleep(0.1)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful shutdown) and its exit status."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        return self._process.wait(timeout)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> KeelProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
