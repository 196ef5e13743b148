"""A chat completion names a prompt (extension field or header): the rendered prompt comes first, the
version's model config fills what the request left unset, and the audit record says which version answered."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest

from keel.testing import FakeUpstream
from keel.testing.server import KeelServer


def test_the_prompt_field_renders_before_the_messages_with_its_model_defaults(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    admin.push(spec(prompt_name, labels=["production"]))
    request_id = f"req-{uuid.uuid4().hex[:10]}"
    reply = client.chat.completions.create(
        model="fake",
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello?"}],
        extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
        extra_headers={"X-Request-ID": request_id},
    )
    assert reply.choices[0].message.content == "Hello from FakeUpstream."
    sent = fake.requests[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "You are the friendly assistant of Acme."},
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello?"},
    ]
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 64)

    record = admin.record(request_id)
    assert record["prompt"] == {
        "name": prompt_name,
        "version": 1,
        "label": "production",
        "experiment": None,
        "variant": None,
        "variables": ["company"],  # names only: values may be personal data
    }

    client.chat.completions.create(  # explicit request fields win over the version's config
        model="fake",
        messages=[{"role": "user", "content": "Hello?"}],
        temperature=0.9,
        max_tokens=5,
        extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
    )
    assert (fake.requests[-1].body["temperature"], fake.requests[-1].body["max_tokens"]) == (0.9, 5)


def test_the_header_names_the_prompt_and_the_body_carries_variables(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    admin.push(spec(prompt_name, template="v1 {{ company }}", labels=["production"]))
    admin.push(spec(prompt_name, template="v2 {{ company }}", labels=["staging"]))
    admin.push(spec(prompt_name, template="v3 {{ company }}"))
    for header, expected in (
        (prompt_name, "v1 Acme"),
        (f"{prompt_name}@staging", "v2 Acme"),
        (f"{prompt_name}@3", "v3 Acme"),
        (f"{prompt_name}@latest", "v3 Acme"),
    ):
        request_id = f"req-{uuid.uuid4().hex[:10]}"
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Keel-Prompt": header, "X-Request-ID": request_id},
            extra_body={"prompt": {"variables": {"company": "Acme"}}},
        )
        assert fake.requests[-1].body["messages"][0]["content"] == expected, header
    pinned = admin.record(request_id)["prompt"]
    assert (pinned["version"], pinned["label"]) == (3, "latest")

    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"prompt": {"name": prompt_name, "version": 2, "variables": {"company": "Acme"}}},
    )
    assert fake.requests[-1].body["messages"][0]["content"] == "v2 Acme"

    for header, body in (
        ("bad name!", {"variables": {"company": "Acme"}}),
        (f"{prompt_name}@staging", {"name": "another-prompt"}),
        (f"{prompt_name}@staging", {"version": 1}),
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-Keel-Prompt": header},
                extra_body={"prompt": body},
            )
    with pytest.raises(openai.BadRequestError) as nameless:
        client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}], extra_body={"prompt": {"label": "x"}}
        )
    assert nameless.value.body["param"] == "prompt.name"  # type: ignore[index]


def test_the_versions_model_alias_applies_only_when_the_request_names_none(
    admin: Any, spec: Any, prompt_name: str, keel: KeelServer, tenant: Any, fake: FakeUpstream
) -> None:
    admin.push(spec(prompt_name, model={"alias": "claude", "max_tokens": 32}, labels=["production"]))
    prompt = {"name": prompt_name, "variables": {"company": "Acme"}}
    headers = {"Authorization": f"Bearer {tenant.chat_key}"}
    url = f"{keel.base_url}/chat/completions"
    unnamed = httpx.post(
        url, headers=headers, json={"messages": [{"role": "user", "content": "hi"}], "prompt": prompt}
    )
    assert unnamed.status_code == 200, unnamed.text
    assert unnamed.headers["x-keel-model"] == "claude"
    assert fake.requests[-1].path == "/v1/messages"  # the Anthropic wire format: the alias's provider
    assert fake.requests[-1].body["system"] == "You are the friendly assistant of Acme."

    named = httpx.post(
        url,
        headers=headers,
        json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "prompt": prompt},
    )
    assert named.status_code == 200, named.text
    assert named.headers["x-keel-model"] == "fake"
    assert fake.requests[-1].path == "/v1/chat/completions"
    assert fake.requests[-1].body["max_tokens"] == 32


def test_a_chat_message_template_puts_its_turns_first(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    few_shot = spec(
        prompt_name,
        labels=["production"],
        messages=[
            {"role": "system", "content": "You work for {{ company }}."},
            {"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": "Let me check that for you, {{ tone }}ly."},
        ],
    )
    del few_shot["template"]
    admin.push(few_shot)
    stream = client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "And my refund?"}],
        stream=True,
        extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert fake.requests[-1].body["messages"] == [
        {"role": "system", "content": "You work for Acme."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "Let me check that for you, friendlyly."},
        {"role": "user", "content": "And my refund?"},
    ]


def test_a_request_without_a_prompt_is_untouched(
    admin: Any, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    request_id = f"req-{uuid.uuid4().hex[:10]}"
    client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-ID": request_id}
    )
    assert fake.requests[-1].body["messages"] == [{"role": "user", "content": "hi"}]
    assert "temperature" not in fake.requests[-1].body
    record = admin.record(request_id)
    assert record["prompt"] == {}
    assert "prompt.resolve" in record["stages"]
