"""`keel keys` and `keel tenants set-models`: expiry, model lists, revoking by id or by prefix."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(keel_cli: Cli, tmp_path: Path) -> Cli:
    """The CLI with one remote alias configured besides `local` (never called here)."""
    (tmp_path / "keel.toml").write_text(
        '[models.fake]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    return keel_cli


def _listing(cli: Cli, tenant: str) -> dict[str, list[str]]:
    """keys list, by prefix: [id, prefix, scope, state, expiry, models, last used, label]."""
    rows = [line.split("\t") for line in cli("keys", "list", "--tenant", tenant).stdout.splitlines()]
    return {row[1]: row for row in rows}


def test_keys_expire_and_carry_model_lists(cli: Cli) -> None:
    name = f"exp-{uuid.uuid4().hex[:6]}"
    cli("tenants", "create", name)
    created = cli("keys", "create", "--tenant", name, "--expires", "90d", "--models", "fake, local")
    assert "expires" in created.stdout and "models fake,local" in created.stdout
    key = created.stdout.strip().splitlines()[-1]
    row = _listing(cli, name)[key[:16]]
    assert row[3] == "active" and row[4].startswith("expires ") and row[5] == "fake,local"

    bad = cli("keys", "create", "--tenant", name, "--expires", "soon", check=False)
    assert bad.returncode == 2 and "90d" in bad.stderr
    unknown = cli("keys", "create", "--tenant", name, "--models", "gpt-nope", check=False)
    assert (
        unknown.returncode == 1 and "unknown model alias" in unknown.stderr and "gpt-nope" in unknown.stderr
    )


def test_tenant_model_lists_are_set_and_cleared(cli: Cli) -> None:
    name = f"models-{uuid.uuid4().hex[:6]}"
    cli("tenants", "create", name)
    assert "models fake" in cli("tenants", "set-models", name, "fake").stdout
    assert any(
        line.startswith(name) and line.endswith("\tfake")
        for line in cli("tenants", "list").stdout.splitlines()
    )
    assert "all" in cli("tenants", "set-models", name, "--all").stdout
    assert any(
        line.startswith(name) and line.endswith("all models")
        for line in cli("tenants", "list").stdout.splitlines()
    )
    neither = cli("tenants", "set-models", name, check=False)
    assert neither.returncode == 2
    missing = cli("tenants", "set-models", f"none-{uuid.uuid4().hex[:6]}", "fake", check=False)
    assert missing.returncode == 1 and "no tenant named" in missing.stderr


def test_revoke_by_prefix_needs_the_tenant_and_stays_inside_it(cli: Cli) -> None:
    mine, theirs = f"mine-{uuid.uuid4().hex[:6]}", f"theirs-{uuid.uuid4().hex[:6]}"
    cli("tenants", "create", mine)
    cli("tenants", "create", theirs)
    my_key = cli("keys", "create", "--tenant", mine).stdout.strip().splitlines()[-1]
    their_key = cli("keys", "create", "--tenant", theirs).stdout.strip().splitlines()[-1]

    no_tenant = cli("keys", "revoke", their_key[:16], check=False)
    assert no_tenant.returncode == 1 and "tenant" in no_tenant.stderr
    wrong_tenant = cli("keys", "revoke", their_key[:16], "--tenant", mine, check=False)
    assert wrong_tenant.returncode == 1 and "no active key" in wrong_tenant.stderr
    assert _listing(cli, theirs)[their_key[:16]][3] == "active"

    assert "revoked 1 key(s)" in cli("keys", "revoke", my_key[:16], "--tenant", mine).stdout
    assert _listing(cli, mine)[my_key[:16]][3] == "revoked"

    their_id = _listing(cli, theirs)[their_key[:16]][0]
    other_tenants_id = cli("keys", "revoke", their_id, "--tenant", mine, check=False)
    assert other_tenants_id.returncode == 1
    assert "revoked 1 key(s)" in cli("keys", "revoke", their_id).stdout  # an id is unique: no tenant needed
    assert _listing(cli, theirs)[their_key[:16]][3] == "revoked"
