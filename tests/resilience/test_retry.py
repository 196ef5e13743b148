"""The retry policy's arithmetic and the classification of failures, without any server."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from keel.errors import (
    InvalidRequestError,
    KeelError,
    OverloadedError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    upstream_status_error,
)
from keel.llm.http import ConnectError, ConnectionLost
from keel.llm.resilience import FailureKind, RetryModel, classify, retry_after
from keel.llm.trace import NoObserver
from keel.settings import RetryConfig


class _Never:
    provider = "openai"

    def supports_tools(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


def policy(**config: object) -> RetryModel:
    return RetryModel(
        _Never(),  # type: ignore[arg-type]
        RetryConfig(**config),  # type: ignore[arg-type]
        alias="a",
        observer=NoObserver(),
        rng=random.Random(7),
    )


def status(code: int, headers: dict[str, str] | None = None, message: str = "no") -> KeelError:
    return upstream_status_error(
        provider="openai", model="m", status=code, message=message, headers=headers or {}
    )


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one wins
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after(headers) == seconds


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after({"retry-after": when}) or 0) <= 30


def test_backoff_is_full_jitter_bounded_by_the_ceiling() -> None:
    retry = policy(backoff_initial=0.5, backoff_max=4.0)
    error = status(500)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [retry.delay(failures, error, None) for _ in range(200)]
        assert all(d is not None and 0 <= d <= ceiling for d in delays)
        assert max(d for d in delays if d is not None) > 0.8 * ceiling  # the whole range is used


def test_the_upstreams_retry_after_is_honoured_within_limits() -> None:
    retry = policy(max_wait=20)
    assert retry.delay(1, status(429, {"Retry-After": "3"}), None) == 3
    assert retry.delay(1, status(503, {"retry-after-ms": "120"}), None) == 0.12
    assert retry.delay(1, status(429, {"Retry-After": "21"}), None) is None  # past max_wait: fall back
    assert retry.delay(1, status(429, {"Retry-After": "3"}), 2.5) is None  # past the deadline: fall back
    assert policy(wait=False).delay(1, status(429, {"Retry-After": "3"}), 2.5) is None  # tests decide alike
    assert policy(wait=False).delay(1, status(500), 2.5) == 0  # but never sleep on backoff


def _cause(exc: UpstreamError, cause: BaseException) -> UpstreamError:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (status(400), FailureKind.INVALID_REQUEST),
        (
            status(400, message="This model's maximum context length is 8192 tokens"),
            FailureKind.CONTEXT_LENGTH,
        ),
        (
            status(400, message="prompt is too long: 210000 tokens > 200000 maximum"),
            FailureKind.CONTEXT_LENGTH,
        ),
        (InvalidRequestError("too long", code="context_length_exceeded"), FailureKind.CONTEXT_LENGTH),
        (status(401), FailureKind.AUTH),
        (status(403), FailureKind.AUTH),
        (status(404), FailureKind.NOT_FOUND),
        (status(408), FailureKind.TIMEOUT),
        (status(409), FailureKind.CONFLICT),
        (status(429), FailureKind.RATE_LIMITED),
        (status(500), FailureKind.SERVER_ERROR),
        (status(501), FailureKind.UPSTREAM_STATUS),
        (status(502), FailureKind.SERVER_ERROR),
        (status(503), FailureKind.OVERLOADED),
        (status(504), FailureKind.TIMEOUT),
        (status(529), FailureKind.OVERLOADED),
        (UpstreamTimeoutError("slow", provider="p", model="m"), FailureKind.TIMEOUT),
        (
            UpstreamTimeoutError("t", provider="p", model="m", code="first_token_timeout"),
            FailureKind.FIRST_TOKEN_TIMEOUT,
        ),
        (
            _cause(
                UpstreamUnavailableError("refused", provider="p", model="m"),
                ConnectError("cannot connect to 127.0.0.1:9: refused"),
            ),
            FailureKind.CONNECTION_REFUSED,
        ),
        (
            _cause(UpstreamError("reset", provider="p", model="m"), ConnectionLost("closed")),
            FailureKind.CONNECTION_ERROR,
        ),
        (UpstreamError("malformed stream chunk", provider="p", model="m"), FailureKind.BAD_RESPONSE),
        (
            UpstreamUnavailableError("overloaded_error in stream", provider="p", model="m"),
            FailureKind.OVERLOADED,
        ),
        (OverloadedError("local model busy"), FailureKind.CAPACITY),
        (ValueError("a bug"), FailureKind.INTERNAL),
    ],
)
def test_classification(error: BaseException, kind: FailureKind) -> None:
    assert classify(error) is kind
