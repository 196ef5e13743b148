"""The first-start admin key: shown once on a terminal only, always kept in DATA_DIR/admin.key (0600)."""

from __future__ import annotations

import os
import pty
import stat
from pathlib import Path

import pytest

from keel.app import announce_admin_key
from keel.settings import Settings
from keel.tenants.keys import generate

SECRET = generate().secret


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, database_url="postgresql://unused@127.0.0.1/unused")


def test_a_terminal_sees_the_key_once(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as terminal:
            path = announce_admin_key(_settings(tmp_path), SECRET, terminal)
        shown = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert SECRET in shown and str(path) in shown
    assert path.read_text().strip() == SECRET


def test_logs_get_the_path_never_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = announce_admin_key(_settings(tmp_path), SECRET)  # stderr, captured: not a terminal
    printed = capsys.readouterr()
    assert SECRET not in printed.err + printed.out
    assert str(path) in printed.err
    assert path.read_text().strip() == SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_existing_readable_file_is_made_private_before_the_key_is_written(tmp_path: Path) -> None:
    old = tmp_path / "admin.key"
    old.write_text("old\n")
    old.chmod(0o644)
    with open(os.devnull, "w") as quiet:
        path = announce_admin_key(_settings(tmp_path), SECRET, quiet)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == SECRET
