"""Every route with a key is rate limited per tenant, not only chat: one request of the tier's requests per
minute and one concurrency slot while it runs, in a bucket of its own (so it cannot starve chat)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai

from keel.settings import PromptSettings, TierLimits
from keel.testing.server import KeelServer


def _free(rpm: int = 1000, concurrent: int = 100) -> dict[str, TierLimits]:
    return {
        "free": TierLimits(
            requests_per_minute=rpm, tokens_per_minute=1_000_000, concurrent_requests=concurrent
        )
    }


def _get(server: KeelServer, path: str, key: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_every_route_spends_the_tenants_requests_per_minute(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
) -> None:
    server = start_keel(tiers=_free(rpm=3))
    tenant, other = make_tenant("free"), make_tenant("free")
    assert _get(server, "/models", tenant.chat_key).status_code == 200
    assert _get(server, "/keys", tenant.admin_key).status_code == 200  # admin routes too, same budget
    missing = _get(server, "/conversations/none-such", tenant.chat_key)
    assert missing.status_code == 404  # spent too: the route ran

    refused = _get(server, "/models", tenant.chat_key)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "requests per minute" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert _get(server, "/keys", tenant.admin_key).status_code == 429

    assert _get(server, "/models", other.chat_key).status_code == 200  # per tenant
    # Chat keeps its own budget: a burst of other calls does not lock the tenant out of chat.
    make_client(server, tenant.chat_key).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "Hi"}]
    )


def test_a_running_route_holds_a_concurrency_slot(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any]
) -> None:
    # Feedback for an unknown request id waits once for its audit record: a route that runs for a while.
    server = start_keel(tiers=_free(concurrent=1), prompts=PromptSettings(feedback_wait_seconds=1.5))
    tenant = make_tenant("free")
    answers: list[httpx.Response] = []

    def slow_feedback() -> None:
        answers.append(
            httpx.post(
                f"{server.base_url}/feedback",
                headers={"Authorization": f"Bearer {tenant.chat_key}"},
                json={"request_id": "req_none_such", "score": 1},
                timeout=30,
            )
        )

    worker = threading.Thread(target=slow_feedback)
    worker.start()
    time.sleep(0.5)
    busy = _get(server, "/models", tenant.chat_key)
    worker.join()
    assert busy.status_code == 429, busy.text
    assert "concurrent requests: limit 1" in busy.json()["error"]["message"]
    assert answers[0].status_code == 404
    assert _get(server, "/models", tenant.chat_key).status_code == 200  # the slot was released
