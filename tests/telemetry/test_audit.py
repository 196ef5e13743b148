"""The audit record of every model call: found by request id, exact payload, tenant-scoped, redacted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import httpx
import openai
import pytest

from keel.llm import Attempt
from keel.telemetry.redact import hash_end_user
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


def _admin_get(keel: KeelServer, key: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{keel.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, params=params)


def _record(keel: KeelServer, key: str, request_id: str) -> dict[str, Any]:
    """Records are written off the critical path: wait for this one to land."""
    deadline = time.monotonic() + 10
    while True:
        response = _admin_get(keel, key, f"/requests/{request_id}")
        if response.status_code == 200:
            record: dict[str, Any] = response.json()
            return record
        assert response.status_code == 404, response.text
        assert time.monotonic() < deadline, f"audit record of {request_id} never landed"
        time.sleep(0.05)


def test_a_request_is_found_by_its_id_with_everything(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    request_id = f"audit-{uuid.uuid4().hex[:10]}"
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    fake.enqueue(Reply(text="Paris is the capital.", input_tokens=21, output_tokens=5))
    client.chat.completions.create(
        model="fake",
        messages=[
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "Capital of France?"},
        ],
        max_tokens=50,
        temperature=0.2,
        user="end-user-7",
        extra_headers={"X-Request-ID": request_id},
        extra_body={"conversation_id": conversation},
    )
    record = _record(keel, tenant.admin_key, request_id)  # found by the client's id ...
    assert record["client_request_id"] == request_id
    assert record["id"].startswith("req_")  # ... but the request id is Keel's own
    assert _record(keel, tenant.admin_key, record["id"]) == record
    assert len(record["trace_id"]) == 32
    assert record["status"] == "ok"
    # The end user is stored hashed (audit_end_user = "hash", the default), here and in the request.
    assert record["end_user"] == hash_end_user(tenant.tenant_id, "end-user-7")
    assert record["request"]["user"] == record["end_user"]
    assert "end-user-7" not in str(record)
    assert record["conversation_id"] == conversation
    assert record["model"]["requested"] == "fake"
    assert record["model"]["answered"] == "fake"
    assert fake.requests[-1].body["user"] == "end-user-7"  # the upstream gets it as sent
    assert record["request"]["messages"] == fake.requests[-1].body["messages"]  # exactly what went upstream
    assert record["request"]["max_tokens"] == 50
    assert record["request"]["temperature"] == 0.2
    assert record["reply"] == {"text": "Paris is the capital.", "tool_calls": []}
    assert record["finish_reason"] == "stop"
    assert record["usage"] == {"input_tokens": 21, "output_tokens": 5, "total_tokens": 26, "estimated": False}
    assert len(record["attempts"]) >= 1
    assert record["attempts"][-1]["error_type"] is None
    timings = {"started", "latency", "first_token"}  # perf_counter values: stored as ms from the start
    expected = {f.name for f in fields(Attempt)} - timings | {f"{name}_ms" for name in timings}
    assert set(record["attempts"][-1]) == expected
    assert record["latency_ms"] > 0
    assert record["ttft_ms"] is not None
    assert {"prompt.resolve", "context.load", "retrieval", "context.assemble", "model.call"} <= set(
        record["stages"]
    )


def test_failed_calls_are_recorded_as_errors(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    request_id = f"audit-{uuid.uuid4().hex[:10]}"
    fake.enqueue(*[Reply(status=400, error_message="bad thing") for _ in range(3)])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Request-ID": request_id},
        )
    record = _record(keel, tenant.admin_key, request_id)
    assert record["status"] == "error"
    assert "bad thing" in record["error"]
    assert record["reply"] == {"text": "", "tool_calls": []}
    assert record["attempts"][-1]["error_type"] is not None


def test_audit_api_is_admin_only_and_tenant_scoped(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, make_tenant: Callable[..., Any]
) -> None:
    request_id = f"audit-{uuid.uuid4().hex[:10]}"
    client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Request-ID": request_id}
    )
    _record(keel, tenant.admin_key, request_id)
    assert _admin_get(keel, tenant.chat_key, f"/requests/{request_id}").status_code == 403
    other = make_tenant()
    response = _admin_get(keel, other.admin_key, f"/requests/{request_id}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    listing = _admin_get(keel, other.admin_key, "/requests").json()
    assert request_id not in {r["client_request_id"] for r in listing["data"]}
    replay = httpx.post(
        f"{keel.base_url}/requests/{request_id}/replay",
        headers={"Authorization": f"Bearer {other.admin_key}"},
    )
    assert replay.status_code == 404


def test_listing_filters_and_pages(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    ids = []
    for i in range(5):
        request_id = f"page-{i}-{uuid.uuid4().hex[:6]}"
        ids.append(request_id)
        client.chat.completions.create(
            model="fake" if i % 2 == 0 else "claude",
            messages=[{"role": "user", "content": f"turn {i}"}],
            max_tokens=20,
            extra_headers={"X-Request-ID": request_id},
            extra_body={"conversation_id": conversation},
        )
    _record(keel, tenant.admin_key, ids[-1])
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"conversation_id": conversation, "limit": 2}
        if after is not None:
            params["after"] = after
        page = _admin_get(keel, tenant.admin_key, "/requests", **params).json()
        seen += [r["client_request_id"] for r in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
        # Opaque: no global row id in it (a number that would count every tenant's requests).
        assert isinstance(after, str) and not after.isdigit()
    assert seen == list(reversed(ids))  # newest first, every record once
    claude = _admin_get(
        keel, tenant.admin_key, "/requests", conversation_id=conversation, model="claude"
    ).json()
    assert [r["client_request_id"] for r in claude["data"]] == [ids[3], ids[1]]
    future = _admin_get(
        keel, tenant.admin_key, "/requests", conversation_id=conversation, since=time.time() + 60
    )
    assert future.json()["data"] == []
    for name, value in (("since", "yesterday"), ("since", "99999999999999999999"), ("until", "1e999")):
        bad = _admin_get(keel, tenant.admin_key, "/requests", **{name: value})
        assert bad.status_code == 400, (value, bad.text)
        assert bad.json()["error"]["param"] == name
    for cursor in ("12345", "not a cursor", "W10"):  # W10 is base64 of []
        bad = _admin_get(keel, tenant.admin_key, "/requests", after=cursor)
        assert bad.status_code == 400, (cursor, bad.text)
        assert bad.json()["error"]["param"] == "after"


def test_secrets_are_redacted_before_storage(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    request_id = f"audit-{uuid.uuid4().hex[:10]}"
    fake.enqueue(Reply(text="Noted: write to ada@example.com, card 4111 1111 1111 1111."))
    client.chat.completions.create(
        model="fake",
        messages=[
            {"role": "user", "content": "My key is sk-proj-abcdefghijklmnop1234 and mail ada@example.com"}
        ],
        extra_headers={"X-Request-ID": request_id},
    )
    record = _record(keel, tenant.admin_key, request_id)
    stored = str(record["request"]) + str(record["reply"])
    for secret in ("sk-proj-abcdefghijklmnop1234", "ada@example.com", "4111 1111 1111 1111"):
        assert secret not in stored
    assert "[REDACTED]" in record["request"]["messages"][0]["content"]
    # Only storage is redacted: the model got the real text.
    assert "ada@example.com" in fake.requests[-1].body["messages"][0]["content"]


def test_metadata_only_tenant(
    keel: KeelServer,
    make_tenant: Callable[..., Any],
    make_client: Callable[..., openai.OpenAI],
    database_url: str,
) -> None:
    import asyncio

    from keel.db.engine import create_engine
    from keel.tenants import TenantService

    quiet = make_tenant()

    async def switch() -> None:
        engine = create_engine(database_url, pool_size=1)
        await TenantService(engine).set_audit_content(quiet.name, False)
        await engine.dispose()

    asyncio.run(switch())
    request_id = f"audit-{uuid.uuid4().hex[:10]}"
    make_client(keel, quiet.chat_key).chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "private words"}],
        extra_headers={"X-Request-ID": request_id},
    )
    record = _record(keel, quiet.admin_key, request_id)
    assert record["request"]["messages"] is None
    assert record["reply"] is None
    assert record["usage"]["total_tokens"] > 0  # metadata is still there
    replay = httpx.post(
        f"{keel.base_url}/requests/{request_id}/replay",
        headers={"Authorization": f"Bearer {quiet.admin_key}"},
    )
    assert replay.status_code == 400


def test_replay_over_the_api_is_recorded_and_linked(
    client: openai.OpenAI, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    request_id = f"audit-{uuid.uuid4().hex[:10]}"
    fake.enqueue(Reply(text="first answer"))
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "replay me"}],
        temperature=0.5,
        extra_headers={"X-Request-ID": request_id},
    )
    _record(keel, tenant.admin_key, request_id)
    original_upstream = fake.requests[-1].body
    fake.enqueue(Reply(text="a different answer", input_tokens=9, output_tokens=3))
    response = httpx.post(
        f"{keel.base_url}/requests/{request_id}/replay",
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
        json={"model": "claude"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["original"]["text"] == "first answer"
    assert result["replay"]["text"] == "a different answer"
    assert result["replay"]["model"] == "claude"
    assert result["identical"] is False
    assert "-first answer" in result["diff"] and "+a different answer" in result["diff"]
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"  # went to the other model ...
    assert sent.body["temperature"] == original_upstream["temperature"]  # ... with the recorded parameters
    replayed = _record(keel, tenant.admin_key, result["replay"]["id"])
    original = _record(keel, tenant.admin_key, request_id)
    assert result["original"]["id"] == original["id"]
    assert replayed["replay_of"] == original["id"]  # Keel's id, though the replay named the client's
    assert replayed["model"]["answered"] == "claude"


def test_end_user_is_stored_as_sent_when_configured_plain(
    start_keel: Callable[..., KeelServer], tenant: Any, make_client: Callable[..., openai.OpenAI]
) -> None:
    server = start_keel(audit_end_user="plain")
    request_id = f"audit-{uuid.uuid4().hex[:10]}"
    make_client(server, tenant.chat_key).chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "x"}],
        user="end-user-8",
        extra_headers={"X-Request-ID": request_id},
    )
    record = _record(server, tenant.admin_key, request_id)
    assert record["end_user"] == "end-user-8"
    assert record["request"]["user"] == "end-user-8"
