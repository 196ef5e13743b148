"""PostgreSQL away during load: requests keep being served, audit records wait and land when it returns."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from keel.testing import TcpProxy
from keel.testing.server import KeelServer


def _metric(server: KeelServer, name: str) -> float:
    for family in text_string_to_metric_families(
        httpx.get(f"{server.url}/metrics", headers=server.admin_headers()).text
    ):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


def test_database_outage_during_load(
    database_url: str,
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
) -> None:
    parts = urlsplit(database_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = database_url.replace(f":{parts.port}/", f":{proxy.port}/")
        server = start_keel(database_url=proxied, auth_cache_ttl_seconds=300)
        tenant = make_tenant()
        client = make_client(server, tenant.chat_key)
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "warm"}])

        sent: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                request_id = f"outage-{uuid.uuid4().hex[:12]}"
                try:
                    client.chat.completions.create(
                        model="fake",
                        messages=[{"role": "user", "content": "during the outage"}],
                        extra_headers={"X-Request-ID": request_id},
                    )
                    sent.append(request_id)
                except Exception as exc:  # collected: the assertion below names them
                    failures.append(exc)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        admin = server.admin_headers()
        assert httpx.get(f"{server.url}/readyz", headers=admin, timeout=30).status_code == 200  # key cached
        proxy.cut()
        outage_started = len(sent)
        time.sleep(3.0)
        served_during_outage = len(sent) - outage_started
        depth_during_outage = _metric(server, "keel_write_queue_depth")
        ready = httpx.get(f"{server.url}/readyz", headers=admin, timeout=30)
        proxy.restore()
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join(30)

        assert failures == []
        assert served_during_outage > 20  # kept answering without the database
        assert depth_during_outage > 0  # records waited ...
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"]["ok"] is False

        deadline = time.monotonic() + 20
        while _metric(server, "keel_write_queue_depth") > 0:
            assert time.monotonic() < deadline, "queued records never landed after the database came back"
            time.sleep(0.2)
        assert _metric(server, "keel_write_queue_dropped_total") == 0
        headers = {"Authorization": f"Bearer {tenant.admin_key}"}
        for request_id in sent[-5:] + sent[outage_started : outage_started + 5]:
            response = httpx.get(f"{server.base_url}/requests/{request_id}", headers=headers)
            assert response.status_code == 200, f"{request_id}: {response.text}"  # ... and landed
