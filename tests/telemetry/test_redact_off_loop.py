"""A 1 MB adversarial body is recorded (redacted, capped) without stalling the process: a real `keel serve`
in its own process, /healthz timed from another client meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from keel.testing import FakeUpstream, KeelProcess

BODY_CHARS = 1_000_000
HEALTHZ_BUDGET = 0.050  # seconds


# The other client is a process of its own: a thread in pytest's process would be timed against the GIL
# of the Keel servers other tests run in-process, not against the server under test.
_POLLER = """
import json, pathlib, sys, time, httpx
base, stop = sys.argv[1], pathlib.Path(sys.argv[2])
latencies = []
with httpx.Client(timeout=30) as health:
    health.get(base + "/healthz")  # connect first: only the answers are timed
    while not stop.exists():
        began = time.perf_counter()
        assert health.get(base + "/healthz").status_code == 200
        latencies.append(time.perf_counter() - began)
        time.sleep(0.005)
print(json.dumps(latencies))
"""


def test_a_1mb_adversarial_body_leaves_healthz_answering(
    database_url: str, fake: FakeUpstream, tmp_path: Path, tenant: Any
) -> None:
    config = tmp_path / "keel.toml"
    config.write_text(
        f'default_model = "fake"\n[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n'
    )
    env = {"KEEL_DATABASE_URL": database_url, "KEEL_CONFIG": str(config), "KEEL_LOG_LEVEL": "WARNING"}
    content = ("a." * BODY_CHARS)[:BODY_CHARS]  # the old e-mail pattern took minutes on this
    client_id = f"adversarial-{uuid.uuid4().hex[:8]}"
    with KeelProcess(tmp_path, env) as server:
        base = server.base_url.removesuffix("/v1")
        stop = tmp_path / "stop"
        poller = subprocess.Popen(
            [sys.executable, "-c", _POLLER, base, str(stop)], stdout=subprocess.PIPE, text=True
        )
        try:
            time.sleep(0.2)
            answer = httpx.post(
                f"{server.base_url}/chat/completions",
                headers={
                    "Authorization": f"Bearer {tenant.chat_key}",
                    "X-Keel-Timeout": "0.001",  # fails fast: no upstream cost, still recorded
                    "X-Request-Id": client_id,
                },
                json={"model": "fake", "messages": [{"role": "user", "content": content}]},
                timeout=60,
            )
            assert answer.status_code in (200, 504), answer.text
            record = _wait_for_record(server.base_url, tenant.admin_key, client_id)
            time.sleep(0.2)
        finally:
            stop.touch()
            output, _ = poller.communicate(timeout=30)
    latencies: list[float] = json.loads(output)
    stored = record["request"]["messages"][0]["content"]
    assert stored.startswith("a.a.") and stored.endswith(f"[TRUNCATED {BODY_CHARS - 262_144} chars]")
    assert len(latencies) > 20
    worst = max(latencies)
    assert worst < HEALTHZ_BUDGET, f"/healthz took up to {worst * 1000:.1f} ms ({len(latencies)} samples)"


def _wait_for_record(base_url: str, admin_key: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(
            f"{base_url}/requests/{request_id}", headers={"Authorization": f"Bearer {admin_key}"}
        )
        if response.status_code == 200:
            record: dict[str, Any] = response.json()
            return record
        assert time.monotonic() < deadline, "the audit record never landed"
        time.sleep(0.02)
