"""Templates are bounded: what a template alone shows is a 400 at push, what its values cause is a 400 at
render, each within moments, and the process keeps answering others meanwhile (a real `keel serve`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from keel.cli import app
from keel.testing import FakeUpstream, KeelProcess

QUICK = 0.5  # seconds: generous for a shared CI machine; unbounded, each of these ran for minutes or more

NESTED = "{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}"
OVER_AT_PUSH = {
    "power": "{{ 9 ** (9 ** 9) }}",
    "repeat": "{{ '-' * 1000000000 }}",
    "nested-ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested-loops": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "center": "{{ 'x' | center(1000000000) }}",
    "indent": "{{ 'x' | indent(1000000000, true) }}",
    "wordwrap": "{{ 'a b c d' | wordwrap(1, wrapstring='y' * 999999) }}",
    "format": "{{ '%1000000000d' | format(1) }}",
    "percent": "{{ '%(a)999999999s' % {'a': 1} }}",
    "ljust": "{{ 'x'.ljust(1000000000) }}",
    "batch": "{{ [1] | batch(1000000000, 'x') | list }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "spelling-out": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s | list | string %}{% endfor %}{{ ns.s | length }}",  # 5 times longer each time
    "code-size": "{{ 1 }}" * 2_500,  # compiling it would hold the interpreter's lock for long
    "recursion": "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
}


def _spec(name: str, template: str, **variables: str) -> dict[str, Any]:
    return {
        "name": name,
        "variables": {key: {"type": kind} for key, kind in variables.items()},
        "model": {"alias": "fake"},
        "template": template,
        "labels": ["production"],
    }


def _render(client: openai.OpenAI, name: str, variables: dict[str, Any]) -> None:
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"prompt": {"name": name, "variables": variables}},
    )


def _refused(client: openai.OpenAI, name: str, variables: dict[str, Any]) -> tuple[dict[str, Any], float]:
    began = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as failed:
        _render(client, name, variables)
    took = time.perf_counter() - began
    assert failed.value.status_code == 400
    assert failed.value.response.json()["error"]["type"] == "invalid_request_error"
    body: dict[str, Any] = failed.value.body  # type: ignore[assignment]
    return body, took


@pytest.mark.parametrize("case", sorted(OVER_AT_PUSH))
def test_a_template_over_a_limit_is_refused_at_push(admin: Any, prompt_name: str, case: str) -> None:
    began = time.perf_counter()
    refused = admin.push(_spec(prompt_name, OVER_AT_PUSH[case]), expect=400)["error"]
    took = time.perf_counter() - began
    assert refused["param"] == "template"
    assert refused["code"] == "invalid_template"
    assert "limit" in refused["message"] or "deep" in refused["message"], refused["message"]
    assert took < QUICK, f"{case}: refused after {took:.2f} s"
    assert admin.call("GET", "/prompts")["data"] == []


def test_jinja_powers_group_to_the_left(
    admin: Any, prompt_name: str, client: Any, fake: FakeUpstream
) -> None:
    """In Jinja `9**9**9` is `(9**9)**9`, a 78-digit number, not the 370-million-digit `9**(9**9)`."""
    admin.push(_spec(prompt_name, "{{ 9**9**9 }}"))
    _render(client, prompt_name, {})
    assert fake.requests[-1].body["messages"][0]["content"] == str((9**9) ** 9)


def test_values_over_a_limit_are_refused_at_render(admin: Any, prompt_name: str, client: Any) -> None:
    admin.push(_spec(prompt_name, "{{ '-' * width }}", width="number"))
    _render(client, prompt_name, {"width": 1})  # compiled and cached: what follows times the render alone
    huge, took = _refused(client, prompt_name, {"width": 1_000_000_000})
    assert huge["code"] == "prompt_too_complex" and huge["param"] == "prompt"
    assert "1000000000" in huge["message"]
    assert took < QUICK
    beyond = _refused(client, prompt_name, {"width": 2**60})[0]  # numbers are bounded where they come in
    assert beyond["code"] == "invalid_variable" and beyond["param"] == "prompt.variables.width"

    nested = f"{prompt_name}-nested"
    admin.push(_spec(nested, NESTED, n="number"))
    _render(client, nested, {"n": 1})
    for n, words in ((100_000, "range()"), (10_000, "steps")):
        too_many, took = _refused(client, nested, {"n": n})
        assert too_many["code"] == "prompt_too_complex" and words in too_many["message"]
        assert took < QUICK, f"n={n}: refused after {took:.2f} s"

    over_a_list = f"{prompt_name}-list"
    admin.push(_spec(over_a_list, "{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}", xs="list"))
    assert _refused(client, over_a_list, {"xs": list(range(5_000))})[0]["code"] == "prompt_too_complex"


def test_ordinary_templates_still_render(
    admin: Any, prompt_name: str, client: Any, fake: FakeUpstream
) -> None:
    template = (
        "{{ '-' * width }}|{{ tone | center(9) }}|{% for t in topics %}{{ loop.index }}.{{ t }} {% endfor %}"
        "|{{ topics | join(', ') }}|{{ '%05.1f' % 2.5 }}|{{ 'a' ~ tone }}|{{ 2 ** 10 }}"
        "|{% set block %}{{ tone | upper }}{% endset %}{{ block }}|{{ tone.replace('a', 'A') }}"
    )
    admin.push(_spec(prompt_name, template, width="number", tone="string", topics="list"))
    _render(client, prompt_name, {"width": 3, "tone": "calm", "topics": ["billing", "refunds"]})
    assert fake.requests[-1].body["messages"][0]["content"] == (
        "---|   calm  |1.billing 2.refunds |billing, refunds|002.5|acalm|1024|CALM|cAlm"
    )


def test_the_template_text_is_bounded(admin: Any, prompt_name: str) -> None:
    refused = admin.push(_spec(prompt_name, "x" * 100_001), expect=400)["error"]
    assert "100000" in refused["message"]
    many = _spec(prompt_name, "")
    del many["template"]
    many["messages"] = [{"role": "user", "content": "y" * 60_000}, {"role": "user", "content": "z" * 60_000}]
    assert "100000" in admin.push(many, expect=400)["error"]["message"]
    admin.push(_spec(prompt_name, "x" * 100_000), expect=201)


def test_keel_prompts_push_refuses_it_too(database_url: str, tmp_path: Path, tenant: Any) -> None:
    runner = CliRunner(env={"KEEL_DATABASE_URL": database_url, "KEEL_DATA_DIR": str(tmp_path)})
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("name: bomb\ntemplate: \"{{ 'x' | center(1000000000) }}\"\n")
    failed = runner.invoke(app, ["prompts", "push", str(bomb), "--tenant", tenant.name])
    assert failed.exit_code == 1, failed.output
    assert "template is over a template limit" in failed.output


def _poll(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(timeout=30) as health:
        health.get(url)  # connect first: only the answers are timed
        while not stop.is_set():
            began = time.perf_counter()
            assert health.get(url).status_code == 200
            latencies.append(time.perf_counter() - began)
            time.sleep(0.005)


def test_the_process_keeps_serving_while_templates_hit_their_limits(
    database_url: str, fake: FakeUpstream, tmp_path: Path, tenant: Any
) -> None:
    config = tmp_path / "keel.toml"
    config.write_text(
        f'default_model = "fake"\n[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n'
    )
    env = {"KEEL_DATABASE_URL": database_url, "KEEL_CONFIG": str(config), "KEEL_LOG_LEVEL": "WARNING"}
    with KeelProcess(tmp_path, env) as server:
        admin = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {tenant.admin_key}"}
        )
        with admin:
            pushed = admin.post("/prompts", json=_spec("nested", NESTED, n="number"))
            assert pushed.status_code == 201, pushed.text
        latencies: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(
            target=_poll, args=(server.base_url.removesuffix("/v1") + "/healthz", stop, latencies)
        )
        poller.start()
        outcomes: list[tuple[str, float]] = []

        def attack(sdk: openai.OpenAI) -> None:
            for _ in range(4):
                began = time.perf_counter()
                try:
                    _render(sdk, "nested", {"n": 10_000})
                except openai.BadRequestError as exc:
                    outcomes.append((str(exc.code), time.perf_counter() - began))

        clients = [
            openai.OpenAI(base_url=server.base_url, api_key=tenant.chat_key, max_retries=0) for _ in range(6)
        ]
        try:
            _render(clients[0], "nested", {"n": 1})  # compiled and cached first
            attackers = [threading.Thread(target=attack, args=(sdk,)) for sdk in clients]
            for each in attackers:
                each.start()
            for each in attackers:
                each.join()
            time.sleep(0.1)  # and after
        finally:
            stop.set()
            poller.join()
            for sdk in clients:
                sdk.close()
    assert [code for code, _ in outcomes] == ["prompt_too_complex"] * 24
    slowest = max(took for _, took in outcomes)
    assert slowest < 2 * QUICK, f"a refusal took {slowest:.2f} s"
    assert len(latencies) > 10
    assert max(latencies) < QUICK, f"/healthz took up to {max(latencies) * 1000:.0f} ms"
