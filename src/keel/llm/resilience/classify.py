"""What went wrong with one attempt, and what that allows: retry, another deployment, a fallback, or none.

Every failed attempt gets one `FailureKind`; it is the `error_type` of its `Attempt`.
"""

from __future__ import annotations

import re
from enum import StrEnum

from keel.errors import (
    InvalidRequestError,
    KeelError,
    OverloadedError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from keel.llm.http import ConnectError, HTTPError


class FailureKind(StrEnum):
    INVALID_REQUEST = "invalid_request"  # the request itself is wrong: a 400 for the client
    CONTEXT_LENGTH = "context_length"  # too long for this model: a larger one may take it
    AUTH = "auth"  # 401/403: our key or permissions are wrong
    NOT_FOUND = "not_found"  # 404: our model name or URL is wrong
    RATE_LIMITED = "rate_limited"  # 429
    OVERLOADED = "overloaded"  # 503, 529, an in-stream overloaded error
    SERVER_ERROR = "server_error"  # 500, 502
    CONFLICT = "conflict"  # 409
    TIMEOUT = "timeout"  # 408, 504, the connect or socket timeouts
    FIRST_TOKEN_TIMEOUT = "first_token_timeout"
    IDLE_TIMEOUT = "stream_idle_timeout"
    DEADLINE = "deadline_exceeded"  # the request's total deadline ran out
    CONNECTION_REFUSED = "connection_refused"  # nothing listens there (or DNS failed)
    CONNECTION_ERROR = "connection_error"  # reset, closed mid-answer
    BAD_RESPONSE = "bad_response"  # malformed JSON or SSE, a stream without an end, an error event
    UPSTREAM_STATUS = "upstream_status"  # any other status, e.g. 501
    CAPACITY = "capacity"  # our own capacity (the local model's queue) is full
    CIRCUIT_OPEN = "circuit_open"  # skipped: every deployment's breaker is open
    CANCELLED = "cancelled"  # the client went away
    INTERNAL = "internal"  # a bug, not the upstream's doing


# Can succeed when tried again (after a pause).
RETRYABLE = frozenset(
    {
        FailureKind.RATE_LIMITED,
        FailureKind.OVERLOADED,
        FailureKind.SERVER_ERROR,
        FailureKind.CONFLICT,
        FailureKind.TIMEOUT,
        FailureKind.FIRST_TOKEN_TIMEOUT,
        FailureKind.IDLE_TIMEOUT,
        FailureKind.CONNECTION_ERROR,
    }
)
# This deployment is of no use for the rest of the request: another one is tried at once.
DEPLOYMENT_FATAL = frozenset(
    {FailureKind.AUTH, FailureKind.NOT_FOUND, FailureKind.CONNECTION_REFUSED, FailureKind.CAPACITY}
)
# Counts against a deployment's health (its circuit breaker).
UNHEALTHY = (
    RETRYABLE
    | {FailureKind.AUTH, FailureKind.NOT_FOUND, FailureKind.CONNECTION_REFUSED}
    | {FailureKind.BAD_RESPONSE, FailureKind.UPSTREAM_STATUS}
)
# When every attempt failed with one of these, the answer is 503 rather than 502.
UNAVAILABLE = frozenset(
    {
        FailureKind.OVERLOADED,
        FailureKind.CONNECTION_REFUSED,
        FailureKind.CAPACITY,
        FailureKind.CIRCUIT_OPEN,
    }
)
MISCONFIGURED = frozenset({FailureKind.AUTH, FailureKind.NOT_FOUND})

_STATUS_KINDS = {
    401: FailureKind.AUTH,
    403: FailureKind.AUTH,
    404: FailureKind.NOT_FOUND,
    408: FailureKind.TIMEOUT,
    409: FailureKind.CONFLICT,
    429: FailureKind.RATE_LIMITED,
    500: FailureKind.SERVER_ERROR,
    502: FailureKind.SERVER_ERROR,
    503: FailureKind.OVERLOADED,
    504: FailureKind.TIMEOUT,
    529: FailureKind.OVERLOADED,
}
_TIMEOUT_CODES = {kind.value: kind for kind in (FailureKind.FIRST_TOKEN_TIMEOUT, FailureKind.IDLE_TIMEOUT)}
_TIMEOUT_CODES[FailureKind.DEADLINE.value] = FailureKind.DEADLINE
# OpenAI, Azure, vLLM, Anthropic, Gemini and llama.cpp phrasings of "the prompt does not fit".
_CONTEXT_LENGTH = re.compile(
    r"context[ _]?length|context window|maximum context|prompt is too long|input is too long"
    r"|too many (?:input )?tokens|exceeds the (?:model's )?(?:maximum|context)",
    re.IGNORECASE,
)


class CircuitOpenError(UpstreamUnavailableError):
    """Every deployment of an alias is skipped because its breaker is open."""

    default_code = "circuit_open"


class NoDeploymentLeftError(UpstreamUnavailableError):
    """Every deployment of an alias already failed this request in a way that rules it out."""

    default_code = "no_deployment_left"


def classify(exc: BaseException) -> FailureKind:
    if isinstance(exc, CircuitOpenError):
        return FailureKind.CIRCUIT_OPEN
    if isinstance(exc, InvalidRequestError):
        if exc.code == "context_length_exceeded" or _CONTEXT_LENGTH.search(exc.message):
            return FailureKind.CONTEXT_LENGTH
        return FailureKind.INVALID_REQUEST
    if isinstance(exc, OverloadedError):
        return FailureKind.CAPACITY
    if isinstance(exc, RateLimitError):
        return FailureKind.RATE_LIMITED
    if isinstance(exc, UpstreamError):
        return _upstream_kind(exc)
    if isinstance(exc, KeelError):
        return FailureKind.UPSTREAM_STATUS
    return FailureKind.INTERNAL


def _upstream_kind(exc: UpstreamError) -> FailureKind:
    by_code = _TIMEOUT_CODES.get(exc.code or "")
    if by_code is not None:
        return by_code
    if exc.upstream_status is not None:
        return _STATUS_KINDS.get(exc.upstream_status, FailureKind.UPSTREAM_STATUS)
    if isinstance(exc, UpstreamTimeoutError):
        return FailureKind.TIMEOUT
    cause = exc.__cause__
    if isinstance(cause, ConnectError):
        return FailureKind.CONNECTION_REFUSED
    if isinstance(cause, HTTPError):
        return FailureKind.CONNECTION_ERROR
    if isinstance(exc, UpstreamUnavailableError):
        return FailureKind.OVERLOADED
    return FailureKind.BAD_RESPONSE


def upstream_status(exc: BaseException) -> int | None:
    status = getattr(exc, "upstream_status", None)
    return status if isinstance(status, int) else None
