"""Versions, dedupe by content hash, labels and their history, rollback, diff, the promotion gate."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from keel.db.engine import create_engine
from keel.errors import InvalidRequestError
from keel.prompts import GateVerdict, Promotion, PromptRegistry, PromptSpec
from keel.testing import FakeUpstream


def _served(client: openai.OpenAI, fake: FakeUpstream, name: str, **prompt: Any) -> str:
    """The system message the upstream got for a request naming this prompt."""
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"prompt": {"name": name, "variables": {"company": "Acme"}, **prompt}},
    )
    content: str = fake.requests[-1].body["messages"][0]["content"]
    return content


def test_identical_content_is_one_version_and_changes_number_the_next(
    admin: Any, spec: Any, prompt_name: str
) -> None:
    first = admin.push(spec(prompt_name), expect=201)
    assert (first["version"], first["created"]) == (1, True)
    again = admin.push(spec(prompt_name), expect=200)
    assert (again["version"], again["created"]) == (1, False)
    assert again["content_hash"] == first["content_hash"]
    # Description and tags are not content: still version 1.
    assert admin.push(spec(prompt_name, description="Reworded", tags=["x"]))["version"] == 1

    second = admin.push(spec(prompt_name, template="You are {{ company }}'s {{ tone }} helper."), expect=201)
    assert second["version"] == 2
    assert second["content_hash"] != first["content_hash"]
    config_only = admin.push(spec(prompt_name, model={"alias": "fake", "temperature": 0.9}), expect=201)
    assert config_only["version"] == 3  # the same template with another model config is another version

    newest = admin.call("GET", f"/prompts/{prompt_name}")
    assert newest["version"] == 3
    assert newest["labels"] == ["latest"]
    first_version = admin.call("GET", f"/prompts/{prompt_name}", params={"version": 1})
    assert first_version["template"] == "You are the {{ tone }} assistant of {{ company }}."
    assert first_version["variables"]["company"] == {"type": "string", "required": True, "default": None}
    assert first_version["variables"]["tone"] == {"type": "string", "required": False, "default": "friendly"}
    assert first_version["model"] == {"alias": "fake", "temperature": 0.2, "max_tokens": 64}
    assert first_version["author"] == "test admin"
    assert [p["name"] for p in admin.call("GET", "/prompts")["data"]] == [prompt_name]


def test_labels_move_with_a_recorded_history_and_roll_back_in_one_call(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    admin.push(spec(prompt_name, template="One for {{ company }}.", labels=["production"]))
    admin.push(spec(prompt_name, template="Two for {{ company }}."))
    assert _served(client, fake, prompt_name) == "One for Acme."  # production is the default label
    assert _served(client, fake, prompt_name, label="latest") == "Two for Acme."

    moved = admin.move(prompt_name, "production", 2, reason="ship it")
    assert (moved["from"], moved["to"], moved["author"], moved["reason"]) == (1, 2, "test admin", "ship it")
    assert _served(client, fake, prompt_name) == "Two for Acme."
    assert admin.move(prompt_name, "production", 2)["changed"] is False  # no move, no history entry

    back = admin.call("POST", f"/prompts/{prompt_name}/labels/production/rollback")
    assert (back["from"], back["to"]) == (2, 1)
    assert _served(client, fake, prompt_name) == "One for Acme."

    history = admin.call("GET", f"/prompts/{prompt_name}/history")
    assert history["labels"] == {"production": 1, "latest": 2}
    assert [v["version"] for v in history["versions"]] == [1, 2]
    moves = [(m["label"], m["from"], m["to"], m["reason"]) for m in history["moves"]]
    assert moves == [
        ("production", None, 1, "push"),
        ("production", 1, 2, "ship it"),
        ("production", 2, 1, "rollback of 1 -> 2"),
    ]
    assert all(m["author"] == "test admin" and m["created_at"] for m in history["moves"])


def test_unknown_labels_and_versions_are_404_and_latest_cannot_be_moved(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI
) -> None:
    admin.push(spec(prompt_name, labels=["staging"]))
    for params in ({"label": "production"}, {"version": 7}):
        missing = admin.call("GET", f"/prompts/{prompt_name}", expect=404, params=params)
        assert missing["error"]["type"] == "not_found_error"
    assert admin.call("GET", "/prompts/no-such-prompt", expect=404)["error"]["code"] == "prompt_not_found"
    admin.call("PUT", f"/prompts/{prompt_name}/labels/production", expect=404, json={"version": 9})
    latest = admin.call("PUT", f"/prompts/{prompt_name}/labels/latest", expect=400, json={"version": 1})
    assert "latest" in latest["error"]["message"]
    # A label's first move created it: rolling back would leave nothing, so it is refused.
    refused = admin.call("POST", f"/prompts/{prompt_name}/labels/staging/rollback", expect=400)
    assert refused["error"]["code"] == "nothing_to_roll_back"

    # In a request: no silent fallback to another label.
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
        )
    assert unknown.value.body["param"] == "prompt.label"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as no_prompt:
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"prompt": {"name": "no-such-prompt"}},
        )
    assert no_prompt.value.body["param"] == "prompt.name"  # type: ignore[index]


def test_prompts_belong_to_their_tenant(
    admin: Any, spec: Any, prompt_name: str, make_tenant: Any, make_admin: Any, keel: Any, make_client: Any
) -> None:
    admin.push(spec(prompt_name, labels=["production"]))
    other = make_tenant()
    stranger = make_admin(keel, other.admin_key)
    assert stranger.call("GET", "/prompts")["data"] == []
    stranger.call("GET", f"/prompts/{prompt_name}", expect=404)
    stranger.call("PUT", f"/prompts/{prompt_name}/labels/production", expect=404, json={"version": 1})
    with pytest.raises(openai.NotFoundError):
        make_client(keel, other.chat_key).chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
        )
    # The same name in the other tenant is its own prompt, numbered from 1.
    assert stranger.push(spec(prompt_name, template="Mine, {{ company }}."))["version"] == 1
    forbidden = httpx.get(f"{keel.base_url}/prompts", headers={"Authorization": f"Bearer {other.chat_key}"})
    assert forbidden.status_code == 403  # the registry is admin scope


def test_diff_shows_template_and_config_changes(admin: Any, spec: Any, prompt_name: str) -> None:
    admin.push(spec(prompt_name))
    admin.push(
        spec(
            prompt_name,
            template="You are the {{ tone }} helper of {{ company }}.",
            model={"alias": "fake", "temperature": 0.5, "max_tokens": 64},
        )
    )
    diff = admin.call("GET", f"/prompts/{prompt_name}/diff/1/2")["diff"]
    assert f"--- {prompt_name}@1" in diff and f"+++ {prompt_name}@2" in diff
    assert "-You are the {{ tone }} assistant of {{ company }}." in diff
    assert "+You are the {{ tone }} helper of {{ company }}." in diff
    assert "-temperature: 0.2" in diff and "+temperature: 0.5" in diff
    assert "max_tokens" not in diff.replace(" max_tokens: 64", "")  # unchanged lines are context only


class Refuse:
    """A gate that says no, as the evals gate will when a suite fails."""

    def __init__(self) -> None:
        self.asked: list[Promotion] = []

    async def check(self, promotion: Promotion) -> GateVerdict:
        self.asked.append(promotion)
        return GateVerdict(allowed=False, reason="eval suite failed: 7/10")


def test_promotion_to_production_passes_the_gate_and_force_is_recorded(
    database_url: str, tenant: Any, prompt_name: str, spec: Any
) -> None:
    gate = Refuse()

    async def go() -> dict[str, Any]:
        engine = create_engine(database_url, pool_size=2)
        try:
            registry = PromptRegistry(engine, gate=gate)
            pushed = await registry.push(
                tenant.tenant_id, PromptSpec.model_validate(spec(prompt_name)), "ann"
            )
            version = pushed["version"]
            staging = await registry.promote(tenant.tenant_id, prompt_name, version, "staging", "ann")
            assert staging["to"] == version and not gate.asked  # only production is gated
            with pytest.raises(InvalidRequestError) as refused:
                await registry.promote(tenant.tenant_id, prompt_name, version, "production", "ann")
            assert refused.value.code == "promotion_refused"
            assert "7/10" in refused.value.message
            with pytest.raises(InvalidRequestError):  # forcing needs a reason
                await registry.promote(
                    tenant.tenant_id, prompt_name, version, "production", "ann", force=True
                )
            forced = await registry.promote(
                tenant.tenant_id, prompt_name, version, "production", "ann", "hotfix", force=True
            )
            assert forced["forced"] is True
            return await registry.history(tenant.tenant_id, prompt_name)
        finally:
            await engine.dispose()

    history = asyncio.run(go())
    assert [p.label for p in gate.asked] == ["production", "production"]
    production = [m for m in history["moves"] if m["label"] == "production"]
    assert len(production) == 1
    assert production[0]["forced"] is True
    assert production[0]["reason"] == "hotfix (forced past the gate: eval suite failed: 7/10)"
    assert history["labels"]["production"] == 1


def test_a_removed_label_is_gone_for_requests(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    admin.push(spec(prompt_name, template="Beta {{ company }}.", labels=["beta"]))
    assert _served(client, fake, prompt_name, label="beta") == "Beta Acme."
    removed = admin.call("DELETE", f"/prompts/{prompt_name}/labels/beta", params={"reason": "done"})
    assert (removed["from"], removed["to"]) == (1, None)
    with pytest.raises(openai.NotFoundError):
        _served(client, fake, prompt_name, label="beta")
    admin.call("DELETE", f"/prompts/{prompt_name}/labels/beta", expect=404)
    # Rolling back a removal brings the label back.
    assert admin.call("POST", f"/prompts/{prompt_name}/labels/beta/rollback")["to"] == 1
    assert _served(client, fake, prompt_name, label="beta") == "Beta Acme."
