"""Schemathesis hooks for bench/fuzz.py: every error Keel answers is in the OpenAI envelope."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.check
def error_in_openai_envelope(ctx: Any, response: Any, case: Any) -> None:
    if response.status_code < 400:
        return
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= error.keys():
        raise AssertionError(f"{response.status_code} not in the OpenAI envelope: {response.text[:300]}")
    if not isinstance(error["message"], str) or not error["message"]:
        raise AssertionError(f"{response.status_code} with an empty error message")
