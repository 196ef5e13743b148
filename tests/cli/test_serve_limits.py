"""`keel serve` runs uvicorn with `limit_concurrency`: past it, a new request is refused at once."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from keel.testing import FakeUpstream, KeelProcess


def test_serve_refuses_requests_past_limit_concurrency(
    database_url: str, fake: FakeUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "keel.toml"
    config.write_text(
        f'default_model = "fake"\n[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n'
    )
    env = {
        "KEEL_DATABASE_URL": database_url,
        "KEEL_CONFIG": str(config),
        "KEEL_LOG_LEVEL": "WARNING",
        "KEEL_LIMIT_CONCURRENCY": "4",
    }
    with KeelProcess(tmp_path, env) as server:
        health = server.base_url.removesuffix("/v1") + "/healthz"
        assert httpx.get(health).status_code == 200
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)  # accepted by the server
            refused = httpx.get(health)
            assert refused.status_code == 503, refused.text
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(health).status_code != 200:  # the closed connections are let go
            assert time.monotonic() < deadline
            time.sleep(0.05)
