"""Templates: checked at push, strict variables at render (missing, unknown, wrong type), hostile values
stay data, the sandbox holds, the rendered size is bounded. Errors are 400s naming the variable."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from keel.testing import FakeUpstream

HOSTILE = (
    "{{ 7 * 7 }} {% for x in range(3) %}X{% endfor %} {{ ''.__class__.__mro__[1].__subclasses__() }}"
    " {{ config }} {% raw %}{% endraw %} }}{{"
)


def _chat(client: openai.OpenAI, name: str, variables: dict[str, Any]) -> None:
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"prompt": {"name": name, "label": "latest", "variables": variables}},
    )


def _rejected(client: openai.OpenAI, name: str, variables: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as failed:
        _chat(client, name, variables)
    body: dict[str, Any] = failed.value.body  # type: ignore[assignment]
    assert failed.value.status_code == 400
    assert failed.value.response.json()["error"]["type"] == "invalid_request_error"
    return body


def test_push_checks_the_template_and_its_variables(admin: Any, spec: Any, prompt_name: str) -> None:
    syntax = admin.push(spec(prompt_name, template="Hello {{ company "), expect=400)
    assert syntax["error"]["param"] == "template"
    undeclared = admin.push(spec(prompt_name, template="Hello {{ company }} from {{ city }}"), expect=400)
    assert "city" in undeclared["error"]["message"]
    in_messages = spec(prompt_name, messages=[{"role": "system", "content": "Hi {{ who }}"}])
    del in_messages["template"]
    assert admin.push(in_messages, expect=400)["error"]["param"] == "messages.0.content"
    both = spec(prompt_name, messages=[{"role": "system", "content": "Hi"}])
    admin.push(both, expect=400)
    bad_default = spec(prompt_name, variables={"company": {"type": "number", "default": "ten"}})
    admin.push(bad_default, expect=400)
    unknown_key = spec(prompt_name, model={"alias": "fake", "temprature": 0.2})
    admin.push(unknown_key, expect=400)
    assert admin.call("GET", "/prompts")["data"] == []  # nothing was stored


def test_variables_are_strict(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    admin.push(
        spec(
            prompt_name,
            template="{{ company }} {{ tone }} {{ seats }} {{ vip }} {{ topics | join(', ') }}",
            variables={
                "company": {"type": "string", "required": True},
                "tone": {"type": "string", "default": "friendly"},
                "seats": {"type": "number", "default": 1},
                "vip": {"type": "boolean", "default": False},
                "topics": {"type": "list", "default": []},
            },
        )
    )
    missing = _rejected(client, prompt_name, {"tone": "calm"})
    assert missing["param"] == "prompt.variables.company"
    assert missing["code"] == "missing_variable"
    assert "company" in missing["message"]

    unknown = _rejected(client, prompt_name, {"company": "Acme", "colour": "red"})
    assert unknown["param"] == "prompt.variables.colour"
    assert unknown["code"] == "unknown_variable"

    for name, value in (
        ("company", 42),
        ("seats", "many"),
        ("seats", True),  # a boolean is not a number
        ("vip", "yes"),
        ("topics", "billing"),
        ("topics", [{"__class__": "x"}]),  # lists hold plain values only
    ):
        wrong = _rejected(client, prompt_name, {"company": "Acme", name: value})
        assert wrong["param"] == f"prompt.variables.{name}", (name, value)
        assert wrong["code"] == "invalid_variable"

    _chat(client, prompt_name, {"company": "Acme", "seats": 3.5, "vip": True, "topics": ["billing", 2]})
    assert fake.requests[-1].body["messages"][0]["content"] == "Acme friendly 3.5 True billing, 2"


def test_hostile_values_are_rendered_as_text(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    admin.push(spec(prompt_name, template="Company: {{ company }}|{{ tone }}"))
    _chat(client, prompt_name, {"company": HOSTILE, "tone": "{{ tone }}"})
    assert fake.requests[-1].body["messages"][0]["content"] == f"Company: {HOSTILE}|{{{{ tone }}}}"


def test_the_sandbox_stops_template_code_from_reaching_python(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI
) -> None:
    admin.push(spec(prompt_name, template="{{ company.__class__.__mro__[1].__subclasses__() }}"))
    refused = _rejected(client, prompt_name, {"company": "Acme"})
    assert refused["code"] == "prompt_render_failed"

    # A template that fails on some values is the template's fault too: a 400, not a server error.
    divide = f"{prompt_name}-divide"
    admin.push(spec(divide, template="{{ 100 / seats }}", variables={"seats": {"type": "number"}}))
    assert _rejected(client, divide, {"seats": 0})["code"] == "prompt_render_failed"


def test_the_rendered_prompt_is_bounded(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI
) -> None:
    admin.push(
        spec(
            prompt_name,
            template="{% for i in range(times) %}{{ company }}{% endfor %}",
            variables={"company": {"type": "string"}, "times": {"type": "number", "default": 1}},
        )
    )
    too_big = _rejected(client, prompt_name, {"company": "x" * 1000, "times": 200})  # 200,000 > 100,000
    assert too_big["code"] == "prompt_too_large"
    _chat(client, prompt_name, {"company": "x" * 1000, "times": 50})  # 50,000 characters are fine
