"""What the resilience tests share: alias settings, and a client that reports what a user would see:
status, answering model, headers, text, time taken, an in-band stream error."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import openai
import orjson

from keel.settings import BreakerConfig, ModelConfig, RetryConfig

MESSAGES = [{"role": "user", "content": "Hi"}]
FAST = RetryConfig(wait=False)  # backoff off: retries at once (Retry-After and deadlines still decide)
NO_BREAKER = BreakerConfig(enabled=False)  # the matrix server's aliases fail on purpose, test after test


def openai_alias(base_url: str, model: str, **overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "provider": "openai",
        "base_url": base_url,
        "model": model,
        "api_key": "sk-upstream-secret-0123456789",
        "timeout": 10.0,
        "first_token_timeout": 0.5,
        "stream_idle_timeout": 0.5,
        "retry": FAST,
        "breaker": NO_BREAKER,
    }
    values.update(overrides)
    return ModelConfig(**values)


@dataclass
class Answer:
    status: int  # the HTTP status the client got
    model: str | None  # the `model` field of the completion or chunks
    text: str
    headers: httpx.Headers
    elapsed: float  # seconds, request sent → answer (or error) complete
    error: str | None = None  # the error message, from the status or in-band in the stream

    @property
    def attempts(self) -> int:
        return int(self.headers.get("x-keel-attempts", "0"))

    @property
    def fell_back(self) -> bool:
        return self.headers.get("x-keel-fallback") == "1"


def _report(answer: Answer, model: str, stream: bool) -> Answer:
    """With KEEL_RESILIENCE_REPORT=FILE, each answer is appended to FILE (the table in docs/resilience.md)."""
    path = os.environ.get("KEEL_RESILIENCE_REPORT")
    if path:
        line = asdict(answer) | {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
            "asked": model,
            "stream": stream,
            "attempts": answer.attempts,
            "fallback": answer.fell_back,
            "headers": None,
        }
        with open(path, "ab") as out:
            out.write(orjson.dumps(line) + b"\n")
    return answer


def ask(
    client: openai.OpenAI,
    model: str,
    *,
    stream: bool,
    messages: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> Answer:
    """One chat completion through the official SDK; never raises for an API error."""
    answer = _ask(client, model, stream=stream, messages=messages, headers=headers, extra_body=extra_body)
    return _report(answer, model, stream)


def _ask(
    client: openai.OpenAI,
    model: str,
    *,
    stream: bool,
    messages: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> Answer:
    started = time.monotonic()
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages or MESSAGES,
        "extra_headers": headers,
        "extra_body": extra_body,
    }
    try:
        raw = client.chat.completions.with_raw_response.create(stream=stream, **kwargs)
    except openai.APIStatusError as exc:
        return Answer(
            exc.status_code, None, "", exc.response.headers, time.monotonic() - started, exc.message
        )
    if not stream:
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        return Answer(raw.status_code, completion.model, text, raw.headers, time.monotonic() - started)
    model_seen: str | None = None
    text = ""
    error = None
    try:
        for chunk in raw.parse():
            model_seen = chunk.model
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    except openai.APIError as exc:
        error = exc.message
    return Answer(raw.status_code, model_seen, text, raw.headers, time.monotonic() - started, error)
