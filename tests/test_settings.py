"""Settings: defaults, keel.toml, KEEL_* environment, validation, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from keel.settings import Settings


def test_defaults_need_no_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.database_url is None  # embedded PostgreSQL
    assert settings.redis_url is None
    assert settings.data_dir == Path(".keel")
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.default_model == "local"
    assert settings.models["local"].provider == "local"
    assert settings.tiers["free"].requests_per_minute == 60
    assert settings.tiers["free"].tokens_per_minute == 40_000
    assert settings.tiers["free"].concurrent_requests == 4
    assert settings.tiers["pro"].concurrent_requests == 32
    assert settings.tiers["enterprise"].requests_per_minute == 100_000


def test_toml_file_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "custom.toml"
    config.write_text(
        """
port = 9000
cors_origins = ["https://app.example"]
default_model = "smart"

[tiers.free]
requests_per_minute = 5
tokens_per_minute = 100
concurrent_requests = 1

[models.smart]
provider = "anthropic"
model = "claude-sonnet-4-6"
api_key_env = "TEST_ANTHROPIC_KEY"
context_window = 200000
fallbacks = ["fast"]

[models.fast]
provider = "openai"
base_url = "http://127.0.0.1:1/v1"
"""
    )
    monkeypatch.setenv("KEEL_CONFIG", str(config))
    monkeypatch.setenv("KEEL_PORT", "9100")  # the environment beats the file
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-secret")
    settings = Settings()
    assert settings.port == 9100
    assert settings.cors_origins == ["https://app.example"]
    assert settings.tiers["free"].requests_per_minute == 5
    assert settings.tiers["pro"].requests_per_minute == 600  # untouched tiers keep their defaults
    smart = settings.models["smart"]
    assert smart.fallbacks == ["fast"]
    assert smart.resolved_api_key() == "sk-ant-secret"
    assert smart.upstream_base_url() == "https://api.anthropic.com"
    assert "local" in settings.models  # always there


def test_keel_toml_in_the_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keel.toml").write_text("port = 8123\n")
    assert Settings().port == 8123


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"models": {"a": {"provider": "openai", "base_url": "http://x", "fallbacks": ["nope"]}}},
            "unknown fallback",
        ),
        ({"models": {"a": {"provider": "openai", "base_url": "http://x", "fallbacks": ["a"]}}}, "itself"),
        ({"models": {"a": {"provider": "mystery"}}}, "provider"),
        ({"default_model": "missing"}, "default_model"),
        (
            {"tiers": {"gold": {"requests_per_minute": 1, "tokens_per_minute": 1, "concurrent_requests": 1}}},
            "tiers",
        ),
        ({"port": 70000}, "port"),
    ],
)
def test_invalid_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEEL_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(FileNotFoundError):
        Settings()


def test_secrets_never_appear_in_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_DATABASE_URL", "postgresql://keel:hunter2@db/keel")
    monkeypatch.setenv("KEEL_REDIS_URL", "redis://:hunter2@cache:6379/0")
    settings = Settings(models={"x": {"provider": "openai", "base_url": "http://x", "api_key": "sk-hunter2"}})  # type: ignore[dict-item]
    for text in (repr(settings), str(settings), str(settings.redacted())):
        assert "hunter2" not in text
    assert settings.database_url is not None
    assert "hunter2" in settings.database_url.get_secret_value()
