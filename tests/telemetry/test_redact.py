"""Redaction: the defaults catch what they promise in linear time, configured patterns are vetted at start-up,
long text is cut and scanned in windows, end users are hashed."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from keel.settings import DEFAULT_REDACTIONS, Settings
from keel.telemetry.pattern_check import check_patterns
from keel.telemetry.redact import CHUNK, MASK, MAX_OVERLAP, Redactor, hash_end_user


def test_defaults_catch_keys_mail_and_cards() -> None:
    redactor = Redactor(list(DEFAULT_REDACTIONS))
    text = (
        "keys sk-proj-abcdefghijklmnop1234 and sk-ant-api03-AAAAAAAAAAAAAAAAAAAA, aws AKIAABCDEFGHIJKLMNOP, "
        "header Bearer abcdefghijklmnopqrstuvwx, mail jane.doe+x@mail.example.org, card 4111-1111-1111-1111"
    )
    redacted = redactor.text(text)
    for secret in ("sk-proj-", "sk-ant-", "AKIA", "abcdefghijklmnopqrstuvwx", "jane.doe", "4111-1111"):
        assert secret not in redacted
    assert redacted.count(MASK) == 6
    assert redactor.text("order 12345 shipped on 2026-11-28") == "order 12345 shipped on 2026-11-28"


def test_nested_values_and_user_patterns_with_flags() -> None:
    redactor = Redactor([r"(?i)secret-\d+", r"\bpin \d{4}\b"])
    value = {"messages": [{"role": "user", "content": "SECRET-42 and pin 1234"}], "n": 3}
    assert redactor.value(value) == {"messages": [{"role": "user", "content": f"{MASK} and {MASK}"}], "n": 3}
    assert (
        Redactor([]).text("untouched sk-proj-abcdefghijklmnop1234")
        == "untouched sk-proj-abcdefghijklmnop1234"
    )


def test_case_insensitive_patterns_and_the_hints_that_skip_patterns() -> None:
    redactor = Redactor([*DEFAULT_REDACTIONS, r"(?i)secret-\d+"])  # a pattern of its own: no hint, always run
    assert redactor.text("BEARER abcdefghijklmnopqrstuvwx and Secret-7 but not bearer") == (
        f"{MASK} and {MASK} but not bearer"
    )
    # The flag stays with its own pattern: the others keep their case.
    assert Redactor([r"(?i)x-\d", r"ab"]).text("X-1 AB ab") == f"{MASK} AB {MASK}"


def test_the_quick_skips_skip_nothing_a_pattern_would_match() -> None:
    """A string shorter than a pattern's narrowest match skips it, and one scan for all hints skips the
    hinted patterns: a string exactly as long as a match, or with a hint in other case, is still redacted."""
    redactor = Redactor(list(DEFAULT_REDACTIONS))
    assert redactor.text("078-05-1120") == MASK  # exactly the SSN pattern's narrowest match
    assert redactor.text("078-05-112") == "078-05-112"
    assert redactor.text("a://b:c@d") == f"a://{MASK}@d"  # the narrowest default: URL credentials
    assert redactor.text("BEARER abcdefghijklmnopqr") == MASK  # a (?i) pattern's hint, in capitals
    # A mask does not hide a later pattern's hint, nor make one: each pattern sees the text as it is.
    assert redactor.text("sk-abcdefghijklmnopqr jane@mail.example.org") == f"{MASK} {MASK}"
    assert Redactor([r"ab"]).text("ab") == MASK  # a pattern of one's own has no hint: always run
    assert Redactor([]).text("") == ""


SECRETS = {
    "stripe secret key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "stripe restricted key": "rk_live_" + "51H8aaaBBBcccDDDeeeFFF00",
    "github token": "ghp_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6",
    "github fine-grained token": "github_pat_" + "11ABCDEFG0" + "a1b2c3d4e5f6g7h8i9j0" * 3,
    "google api key": "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "pem private key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7bq9\nZm9vYmFy+/==\n"
    "-----END RSA PRIVATE KEY-----",
    "pkcs8 private key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    "-----END PRIVATE KEY-----",
    "aws secret key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "slack token": "xoxb-" + "123456789012-abcdefABCDEF",
    "basic auth": "Authorization: Basic " + "dXNlcjpodW50ZXIy",
    "us ssn": "078-05-1120",
}


@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
def test_each_default_pattern_redacts_its_secret(secret: str) -> None:
    redacted = Redactor(list(DEFAULT_REDACTIONS)).text(f"before {secret} after")
    assert redacted == f"before {MASK} after"


def test_credentials_in_urls_are_redacted_and_the_host_kept() -> None:
    redactor = Redactor(list(DEFAULT_REDACTIONS))
    assert redactor.text("DATABASE_URL=postgres://keel:hunter2@db.internal:5432/keel") == (
        f"DATABASE_URL=postgres://{MASK}@db.internal:5432/keel"
    )
    assert redactor.text("see https://example.com/a/b?q=1 and ftp://host/x") == (
        "see https://example.com/a/b?q=1 and ftp://host/x"
    )


def test_ordinary_text_is_left_alone() -> None:
    text = (
        "commit 0123456789abcdef0123456789abcdef01234567 on 2026-11-28, order 12345, "
        "ask-me-anything, a risk_assessment_of_the_quarterly_numbers, the path src/keel/telemetry/redact.py"
    )
    assert Redactor(list(DEFAULT_REDACTIONS)).text(text) == text


def test_long_text_is_redacted_in_windows_exactly_as_in_one_pass() -> None:
    """Secrets on every side of the window boundaries are found as one pass finds them."""
    secrets = [*SECRETS.values(), "jane.doe@example.org", "4111 1111 1111 1111"]
    filler = "lorem ipsum dolor sit amet, a.b.c " * 40
    parts = []
    for i in range(400):
        parts.append(filler[: (i * 997) % len(filler)])
        parts.append(f" {secrets[i % len(secrets)]} ")
    text = "".join(parts)
    assert len(text) > 4 * (CHUNK + MAX_OVERLAP)
    redactor = Redactor(list(DEFAULT_REDACTIONS), max_chars=len(text))
    redacted = redactor.text(text)
    one_pass_each = text
    for pattern in DEFAULT_REDACTIONS:
        one_pass_each = re.sub(pattern, MASK, one_pass_each)
    assert redacted == one_pass_each
    assert not any(secret in redacted for secret in secrets)


def test_long_strings_are_cut_before_redaction() -> None:
    redactor = Redactor(list(DEFAULT_REDACTIONS), max_chars=1_000)
    assert redactor.text("x" * 1_500) == "x" * 1_000 + "[TRUNCATED 500 chars]"
    assert redactor.text("x" * 1_000) == "x" * 1_000


def test_the_defaults_are_linear_on_adversarial_megabytes() -> None:
    """The old default e-mail pattern took 1 s on 32 KB of `a.a.…` and minutes on 1 MB. Each of these
    runs in well under a second (about 0.3 s; the bound is loose for a busy machine)."""
    redactor = Redactor(list(DEFAULT_REDACTIONS), max_chars=10**7)
    for piece in ("a.", "a", "a@", "1 ", "://a:", "eyJa.", "sk-", "aB3/+", "-----BEGIN PRIVATE KEY-----"):
        text = (piece * (1_000_000 // len(piece) + 1))[:1_000_000]
        began = time.perf_counter()
        redactor.text(text)
        assert time.perf_counter() - began < 5, piece
    check_patterns(DEFAULT_REDACTIONS)  # and they pass the start-up trial that configured patterns face


OLD_EMAIL = r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b"


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a+)+$", "nested quantifiers"),
        (r"(?:x{1,9})*y", "nested quantifiers"),
        (r"\d+\d*x", "adjacent unbounded quantifiers"),
        (r"\w+\s*\w+!", "adjacent unbounded quantifiers"),
        (r"x?", "matches the empty string"),
        (r"(unclosed", "does not compile"),
        (OLD_EMAIL, "super-linear"),  # no nesting: only the timed trial catches it
        (r"(a|aa)+$", "super-linear"),  # exponential: the trial's child process is killed
    ],
)
def test_a_bad_configured_pattern_is_refused_at_start_up(pattern: str, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(redact_patterns=[*DEFAULT_REDACTIONS, pattern])
    message = str(refused.value)
    assert repr(pattern) in message or pattern in message
    assert why in message


def test_a_good_configured_pattern_is_accepted() -> None:
    settings = Settings(redact_patterns=[*DEFAULT_REDACTIONS, r"(?i)\binternal-ticket-\d{1,8}\b"])
    assert settings.redact_patterns[-1] == r"(?i)\binternal-ticket-\d{1,8}\b"


def test_keel_serve_refuses_to_start_with_a_bad_pattern(
    tmp_path: Path, keel_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    (tmp_path / "keel.toml").write_text("redact_patterns = ['(a+)+$']\n")
    done = keel_cli("serve", check=False)
    assert done.returncode != 0
    assert "(a+)+$" in done.stderr and "nested quantifiers" in done.stderr


def test_end_users_hash_per_tenant() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    hashed = hash_end_user(first, "user-42")
    assert hashed is not None and hashed.startswith("sha256:") and "user-42" not in hashed
    assert hashed == hash_end_user(first, "user-42")  # stable: a tenant can group by it
    assert hashed != hash_end_user(second, "user-42")  # but not linkable across tenants
    assert hash_end_user(first, None) is None
