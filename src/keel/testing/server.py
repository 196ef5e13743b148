"""Run a real Keel (uvicorn + the full app) on 127.0.0.1 in a background thread: for tests and demos."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn

from keel.app import create_app
from keel.gateway import Components
from keel.settings import Settings


class KeelServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. asyncio sets it on sockets it opens itself, not on a socket
        # handed to it, and without it every response waits ~40 ms on Nagle and delayed ACKs.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            loop="uvloop",  # as `keel serve` runs: the hot path is tested on the loop it is deployed on
            http="httptools",
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(settings.shutdown_drain_seconds),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def components(self) -> Components:
        """What the lifespan built (models, stores, ...): for tests that reach past the HTTP API."""
        components: Components = self.app.app.state.keel  # type: ignore[attr-defined]
        return components

    def admin_headers(self) -> dict[str, str]:
        """The bootstrap admin key (DATA_DIR/admin.key) as an Authorization header: /metrics and the
        detail of /readyz need an admin key."""
        key = (self.settings.data_dir / "admin.key").read_text().strip()
        return {"Authorization": f"Bearer {key}"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 60.0) -> KeelServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("Keel failed to start; see the log above")
            if time.monotonic() > deadline:
                raise TimeoutError("Keel did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> KeelServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
