"""What the upstream client is configured with, checked at start-up (keel.settings): API keys and headers an
HTTP request can carry, CA bundles that load, proxies from the conventional environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from keel.settings import Settings

PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no keel.toml
    monkeypatch.delenv("KEEL_CONFIG", raising=False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def remote(**fields: Any) -> dict[str, Any]:
    return {"models": {"gpt": {"provider": "openai", **fields}}}


def refused(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    return str(caught.value)


def test_an_api_key_with_a_trailing_newline_is_a_start_up_error() -> None:
    message = refused(**remote(api_key="sk-live-0123456789\n"))
    assert "model 'gpt': the API key (api_key) holds a line break at its end" in message
    assert "0123456789" not in message  # the key itself is never printed


def test_an_api_key_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_KEY_FOR_TEST", "sk-0123456789abcdef\r\n")
    message = refused(**remote(api_key_env="OPENAI_KEY_FOR_TEST"))
    assert "the API key ($OPENAI_KEY_FOR_TEST) holds a line break at position 19" in message
    monkeypatch.setenv("OPENAI_KEY_FOR_TEST", "sk-0123456789abcdef")
    assert Settings(**remote(api_key_env="OPENAI_KEY_FOR_TEST")).models["gpt"].resolved_api_key()


def test_a_key_that_is_not_latin_1_is_a_start_up_error() -> None:
    message = refused(**remote(api_key="sk-“0123456789”"))  # curly quotes from a copy and paste
    assert "holds the character U+201C (not latin-1) at position 3" in message


def test_a_deployment_key_or_header_is_checked_by_its_name() -> None:
    deployments = [{"api_key": "sk-good-0123456789"}, {"name": "eu", "api_key": " sk-spaced-0123456789"}]
    message = refused(**remote(deployments=deployments))
    assert (
        "deployment 'eu' of model 'gpt': the API key (api_key) has leading or trailing whitespace" in message
    )
    message = refused(**remote(headers={"OpenAI-Organization": "org-1\x00"}))
    assert "header 'OpenAI-Organization' holds the character U+0000 at its end" in message


def test_a_ca_bundle_must_load(tmp_path: Path) -> None:
    assert "ca_bundle" in refused(**remote(ca_bundle=str(tmp_path / "absent.pem")))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert "cannot be loaded" in refused(**remote(ca_bundle=str(garbage)))


def test_a_deployment_ca_bundle_overrides_the_alias(tmp_path: Path) -> None:
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        pytest.skip("no system CA bundle file to load")
    settings = Settings(**remote(deployments=[{"base_url": "https://a/v1"}, {"ca_bundle": str(bundle)}]))
    resolved = [config.ca_bundle for _, _, config in settings.models["gpt"].deployment_configs("gpt")]
    assert resolved == [None, bundle]


def test_proxies_default_from_the_conventional_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("http_proxy", "proxy.corp:3129")  # no scheme: http://, as curl reads it
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    upstream = Settings().upstream
    assert (
        upstream.https_proxy is not None
        and upstream.https_proxy.get_secret_value() == "http://proxy.corp:3128"
    )
    assert upstream.http_proxy is not None and upstream.http_proxy.get_secret_value() == "proxy.corp:3129"
    assert upstream.no_proxy == "localhost,.internal"
    monkeypatch.setenv("https_proxy", "http://lower.corp:1")  # the lower-case name wins, as in curl
    monkeypatch.setenv("KEEL_UPSTREAM__NO_PROXY", "*")
    upstream = Settings().upstream
    assert (
        upstream.https_proxy is not None and upstream.https_proxy.get_secret_value() == "http://lower.corp:1"
    )
    assert upstream.no_proxy == "*"


def test_proxy_credentials_stay_out_of_the_logged_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:hunter2@proxy.corp:3128")
    assert "hunter2" not in str(Settings().redacted())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://proxy.corp:443", "must be an http:// URL"),
        ("socks5://proxy.corp:1080", "must be an http:// URL"),
        ("http://proxy.corp:port", "invalid port"),
    ],
)
def test_a_proxy_keel_cannot_use_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", url)
    assert message in refused()
