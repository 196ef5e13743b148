"""Redaction patterns: the defaults catch what they promise, user patterns with inline flags still work."""

from __future__ import annotations

from keel.settings import DEFAULT_REDACTIONS
from keel.telemetry.redact import MASK, Redactor


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


def test_patterns_with_leading_flags_combine_into_one_pass() -> None:
    redactor = Redactor([*DEFAULT_REDACTIONS, r"(?i)secret-\d+"])
    assert len(redactor._patterns) == 1
    assert redactor.text("BEARER abcdefghijklmnopqrstuvwx and Secret-7 but not bearer") == (
        f"{MASK} and {MASK} but not bearer"
    )
    # The flag stays with its own pattern: the others keep their case.
    assert Redactor([r"(?i)x-\d", r"ab"]).text("X-1 AB ab") == f"{MASK} AB {MASK}"
