"""`keel prompts`: prompts kept in git as YAML and Markdown, pushed idempotently, promoted and rolled back
with one command each; a running server serves the change within a second."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import Result
from typer.testing import CliRunner

from keel.cli import app
from keel.testing import FakeUpstream
from keel.testing.server import KeelServer

YAML = """\
name: {name}
description: First-line support
variables:
  company: {{type: string, required: true}}
  tone: {{type: string, default: friendly}}
model: {{alias: fake, temperature: 0.2, max_tokens: 256}}
labels: [production]
template: |
  You are the {{{{ tone }}}} support assistant for {{{{ company }}}}.
"""

MARKDOWN = """\
---
name: {name}-faq
variables:
  question: {{type: string}}
tags: [faq]
---
Answer this FAQ: {{{{ question }}}}
"""


@pytest.fixture
def keel_prompts(database_url: str, tmp_path: Path) -> Callable[..., Result]:
    runner = CliRunner(env={"KEEL_DATABASE_URL": database_url, "KEEL_DATA_DIR": str(tmp_path)})

    def run(*args: str, ok: bool = True) -> Result:
        result = runner.invoke(app, ["prompts", *args])
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def _served(client: openai.OpenAI, fake: FakeUpstream, name: str) -> str:
    client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"prompt": {"name": name, "variables": {"company": "Acme"}}},
    )
    content: str = fake.requests[-1].body["messages"][0]["content"]
    return content


def _eventually(check: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s"
        time.sleep(0.02)


def test_push_promote_rollback_from_files(
    keel_prompts: Callable[..., Result],
    tmp_path: Path,
    tenant: Any,
    prompt_name: str,
    client: openai.OpenAI,
    fake: FakeUpstream,
    keel: KeelServer,
) -> None:
    yaml_file, markdown_file = tmp_path / "support.yaml", tmp_path / "faq.md"
    yaml_file.write_text(YAML.format(name=prompt_name))
    markdown_file.write_text(MARKDOWN.format(name=prompt_name))
    tenant_flag = ("--tenant", tenant.name)

    pushed = keel_prompts("push", str(yaml_file), str(markdown_file), *tenant_flag).output
    assert f"{prompt_name}@1\n" in pushed and f"{prompt_name}-faq@1\n" in pushed
    assert f"{prompt_name}: production (new) -> 1" in pushed
    again = keel_prompts("push", str(yaml_file), *tenant_flag).output
    assert f"{prompt_name}@1  (unchanged)" in again  # the content hash makes pushing idempotent
    assert _served(client, fake, prompt_name) == "You are the friendly support assistant for Acme."

    yaml_file.write_text(
        YAML.format(name=prompt_name).replace("labels: [production]\n", "").replace("support", "billing")
    )
    assert f"{prompt_name}@2\n" in keel_prompts("push", str(yaml_file), *tenant_flag).output
    assert _served(client, fake, prompt_name).startswith("You are the friendly support")  # not promoted yet

    promoted = keel_prompts("promote", prompt_name, "2", *tenant_flag).output
    assert f"{prompt_name}: production 1 -> 2" in promoted
    _eventually(lambda: "billing" in _served(client, fake, prompt_name))

    assert f"{prompt_name}: production 2 -> 1" in keel_prompts("rollback", prompt_name, *tenant_flag).output
    _eventually(lambda: "support" in _served(client, fake, prompt_name))

    listing = keel_prompts("list", *tenant_flag).output
    assert f"{prompt_name}\tlatest=2\tproduction=1" in listing
    assert f"{prompt_name}-faq\tlatest=1" in listing
    shown = keel_prompts("show", f"{prompt_name}@production", *tenant_flag).output
    assert f"{prompt_name}@1  labels: production" in shown
    assert "variable company: string, required" in shown
    assert "You are the {{ tone }} support assistant for {{ company }}." in shown
    faq = keel_prompts("show", f"{prompt_name}-faq", *tenant_flag).output
    assert "Answer this FAQ: {{ question }}" in faq and "tags: faq" in faq

    history = keel_prompts("history", prompt_name, *tenant_flag).output
    assert "production: (new) -> 1" in history
    assert "production: 1 -> 2" in history and "production: 2 -> 1" in history
    diff = keel_prompts("diff", prompt_name, "1", "2", *tenant_flag).output
    assert "-You are the {{ tone }} support assistant for {{ company }}." in diff
    assert "+You are the {{ tone }} billing assistant for {{ company }}." in diff

    assert (
        "v1 95%, v2 5% per user"
        in keel_prompts("canary", "start", prompt_name, "2", "--percent", "5", *tenant_flag).output
    )
    status = keel_prompts("canary", "status", prompt_name, *tenant_flag).output
    assert "baseline" in status and "canary" in status and "started" in status
    assert "canary aborted" in keel_prompts("canary", "abort", prompt_name, *tenant_flag).output


def test_cli_errors_exit_1_with_a_message(
    keel_prompts: Callable[..., Result], tmp_path: Path, tenant: Any
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntemplate: Hi {{ who }}\nmessages: [{role: system, content: hi}]\n")
    failed = keel_prompts("push", str(broken), "--tenant", tenant.name, ok=False)
    assert failed.exit_code == 1 and "exactly one of 'template'" in failed.output
    missing = keel_prompts("show", "no-such-prompt", "--tenant", tenant.name, ok=False)
    assert missing.exit_code == 1 and "No prompt 'no-such-prompt'" in missing.output
    nobody = keel_prompts("list", "--tenant", "no-such-tenant", ok=False)
    assert nobody.exit_code == 1
