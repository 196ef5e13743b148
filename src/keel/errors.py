"""Keel's one error taxonomy. Every error a client can see is a `KeelError`:

    KeelError                      500 server_error
    ├── InvalidRequestError        400 invalid_request_error   (the request itself is wrong)
    ├── AuthenticationError        401 authentication_error    (missing or unknown API key)
    ├── PermissionDeniedError      403 permission_error        (key lacks the scope)
    ├── NotFoundError              404 not_found_error         (unknown model, conversation, ...)
    ├── RequestTimeoutError        408 invalid_request_error   (the body did not arrive in time)
    ├── PayloadTooLargeError       413 invalid_request_error   (body over the limit)
    ├── RateLimitError             429 rate_limit_error        (tenant over its tier; Retry-After)
    │   └── UpstreamRateLimitError 429 rate_limit_error        (a provider's 429, with its headers)
    ├── ClientDisconnectedError    499 client_closed_request   (the client left; nobody reads it)
    ├── OverloadedError            503 overloaded_error        (our own capacity: local model queue full)
    └── UpstreamError              502 upstream_error          (a provider failed; status, provider, model)
        ├── UpstreamTimeoutError   504 timeout_error
        └── UpstreamUnavailableError 503 upstream_unavailable (connection refused, DNS, ...)

The gateway maps each onto the OpenAI envelope {"error": {"message", "type", "param", "code"}}.
An upstream 4xx caused by the request (400, 413, 422) becomes an `InvalidRequestError` for the client,
so user mistakes stay apart from upstream failures. The model layer retries upstream errors and falls back
(keel.llm.resilience); what reaches the client is its verdict once every attempt failed.
"""

from __future__ import annotations

from collections.abc import Mapping


class KeelError(Exception):
    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(KeelError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(KeelError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(KeelError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_scope"


class NotFoundError(KeelError):
    status = 404
    type = "not_found_error"


class RequestTimeoutError(KeelError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLargeError(KeelError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(KeelError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamRateLimitError(RateLimitError):
    """A provider answered 429: the model layer retries it, honouring `retry-after(-ms)`."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        upstream_headers: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code="upstream_rate_limited", headers=headers)
        self.provider = provider
        self.model = model
        self.upstream_status = 429
        self.upstream_headers = {k.lower(): v for k, v in (upstream_headers or {}).items()}


class ClientDisconnectedError(KeelError):
    """The client went away before the answer; the status only shows in logs and metrics."""

    status = 499
    type = "client_closed_request"
    default_code = "client_closed_request"


class OverloadedError(KeelError):
    status = 503
    type = "overloaded_error"
    default_code = "overloaded"


class UpstreamError(KeelError):
    """A provider call failed. `upstream_status` is the provider's HTTP status, when it answered."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        upstream_status: int | None = None,
        upstream_headers: Mapping[str, str] | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.provider = provider
        self.model = model
        self.upstream_status = upstream_status
        self.upstream_headers = {k.lower(): v for k, v in (upstream_headers or {}).items()}


class UpstreamTimeoutError(UpstreamError):
    status = 504
    type = "timeout_error"
    default_code = "upstream_timeout"


class UpstreamUnavailableError(UpstreamError):
    status = 503
    type = "upstream_unavailable"
    default_code = "upstream_unavailable"


def upstream_status_error(
    *, provider: str, model: str, status: int, message: str, headers: Mapping[str, str]
) -> KeelError:
    """Map a provider's HTTP error status onto the taxonomy."""
    text = f"{provider} model {model!r} answered {status}: {message}"
    if status in (400, 413, 422):
        return InvalidRequestError(text, code="upstream_rejected_request")
    if status == 429:
        headers_out = {}
        retry_after = {k.lower(): v for k, v in headers.items()}.get("retry-after")
        if retry_after:
            headers_out["Retry-After"] = retry_after
        return UpstreamRateLimitError(
            text, provider=provider, model=model, upstream_headers=headers, headers=headers_out
        )
    if status in (408, 504):
        return UpstreamTimeoutError(
            text, provider=provider, model=model, upstream_status=status, upstream_headers=headers
        )
    if status in (503, 529):
        return UpstreamUnavailableError(
            text, provider=provider, model=model, upstream_status=status, upstream_headers=headers
        )
    return UpstreamError(
        text, provider=provider, model=model, upstream_status=status, upstream_headers=headers
    )
