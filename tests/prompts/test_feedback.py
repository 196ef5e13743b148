"""POST /v1/feedback: linked to the request and its prompt variant, tenant-scoped, counted by the canary."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai

from keel.testing.server import KeelServer


def _feedback(keel: KeelServer, key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{keel.base_url}/feedback", headers={"Authorization": f"Bearer {key}"}, json=body)


def test_feedback_is_linked_to_the_request_and_its_variant(
    keel: KeelServer,
    tenant: Any,
    admin: Any,
    spec: Any,
    prompt_name: str,
    client: openai.OpenAI,
    make_tenant: Any,
) -> None:
    admin.push(spec(prompt_name, template="One {{ company }}", labels=["production"]))
    admin.push(spec(prompt_name, template="Two {{ company }}"))
    admin.call("POST", f"/prompts/{prompt_name}/canary", expect=201, json={"version": 2, "percent": 50})
    request_id = f"req-{uuid.uuid4().hex[:10]}"
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        user="end-user-1",
        extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
        extra_headers={"X-Request-ID": request_id},
    )
    # Sent at once: the audit record may still be in the write queue, so the link waits for it.
    sent = _feedback(keel, tenant.chat_key, request_id=request_id, score=-1, comment="wrong answer")
    assert sent.status_code == 200, sent.text
    linked = sent.json()["prompt"]
    assert linked["name"] == prompt_name and linked["label"] == "production"
    assert linked["variant"] in ("baseline", "canary")
    assert linked["version"] == (2 if linked["variant"] == "canary" else 1)

    again = _feedback(keel, tenant.chat_key, request_id=request_id, score=0.75)  # replaces the first
    assert again.status_code == 200, again.text
    status = admin.call("GET", f"/prompts/{prompt_name}/canary")
    arm = next(v for v in status["variants"] if v["variant"] == linked["variant"])
    assert (arm["feedback"], arm["feedback_score"], arm["negative"]) == (1, 0.75, 0)

    stranger = make_tenant()
    hidden = _feedback(keel, stranger.chat_key, request_id=request_id, score=1)
    assert hidden.status_code == 404  # another tenant's request is indistinguishable from none
    assert hidden.json()["error"]["param"] == "request_id"

    for score in (2, -0.5, True, "1"):
        refused = _feedback(keel, tenant.chat_key, request_id=request_id, score=score)
        assert refused.status_code == 400, (score, refused.text)
