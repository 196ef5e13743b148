"""One handler per error type, each answering the OpenAI error envelope. Never a stack trace or HTML."""

from __future__ import annotations

import logging

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from keel.errors import KeelError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}
# untranslatable_character (a \u0000 escape in JSON), character_not_in_repertoire (a 0x00 byte in text)
_NUL_STATES = ("22P05", "22021")


def error_response(status: int, envelope: object, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(envelope), status_code=status, headers=headers, media_type="application/json"
    )


def _envelope(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def keel_error_response(exc: KeelError) -> Response:
    if exc.status >= 500:
        log.warning("request failed: %s", exc.message, extra={"status": exc.status, "error_type": exc.type})
    return error_response(exc.status, exc.envelope(), exc.headers)


def _sqlstate(exc: DBAPIError) -> str:
    """The PostgreSQL error code of asyncpg's error under SQLAlchemy's two wrappers ('' when the
    database gave none, e.g. the connection dropped)."""
    cause = exc.orig.__cause__ if exc.orig is not None else None
    return str(cause.sqlstate) if isinstance(cause, asyncpg.PostgresError) else ""


def database_error_response(exc: DBAPIError) -> Response:
    """PostgreSQL refusing a value of the request (SQLSTATE class 22, e.g. a NUL character, which no
    PostgreSQL text or JSON value can hold) is the client's 400; anything else is the database away."""
    sqlstate = _sqlstate(exc)
    if not sqlstate.startswith("22"):
        return database_unavailable_response(exc)
    hint = " (PostgreSQL cannot store the NUL character \\u0000)" if sqlstate in _NUL_STATES else ""
    log.info("database refused a request value: SQLSTATE %s", sqlstate)
    return error_response(
        400,
        _envelope(
            f"The request holds a value that cannot be stored{hint}.",
            "invalid_request_error",
            code="unstorable_value",
        ),
    )


def database_unavailable_response(exc: Exception) -> Response:
    """The database is away (restart, failover, network): a retryable 503, not a 500."""
    log.warning("database unavailable: %s", type(exc).__name__)
    return error_response(
        503,
        _envelope(
            "The database is unavailable; retry shortly.", "service_unavailable", code="database_unavailable"
        ),
        {"Retry-After": "1"},
    )


def dependency_unavailable_response(exc: Exception) -> Response:
    log.warning("a dependency is unreachable: %r", exc)
    return error_response(
        503,
        _envelope("A service Keel depends on is unreachable; retry shortly.", "service_unavailable"),
        {"Retry-After": "1"},
    )


def unexpected_error_response(request_id: str) -> Response:
    """Call inside the `except` block: the traceback goes to the log, never to the client."""
    log.exception("unhandled error")
    return error_response(
        500,
        _envelope(f"Internal error; quote request id {request_id} when reporting it.", "server_error"),
        {"x-request-id": request_id},
    )


def response_for(exc: Exception, request_id: str) -> Response:
    """What the handlers installed below answer, for routes that are plain ASGI apps (no FastAPI
    exception middleware around them). Call inside the `except` block."""
    if isinstance(exc, KeelError):
        return keel_error_response(exc)
    if isinstance(exc, DBAPIError):
        return database_error_response(exc)
    if isinstance(exc, OSError):
        return dependency_unavailable_response(exc)
    return unexpected_error_response(request_id)


async def keel_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KeelError)
    return keel_error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, KeelError):  # FastAPI's 400 around a failed body read (a 408, a 413)
        return keel_error_response(exc.__cause__)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    return error_response(
        exc.status_code,
        _envelope(message, _TYPES.get(exc.status_code, "invalid_request_error")),
        dict(exc.headers or {}),
    )


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    return error_response(
        400,
        _envelope(
            f"Invalid request: {first.get('msg', 'bad input')}", "invalid_request_error", param or None
        ),
    )


async def database_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DBAPIError)
    return database_error_response(exc)


async def dependency_unavailable(request: Request, exc: Exception) -> Response:
    return dependency_unavailable_response(exc)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    return unexpected_error_response(getattr(request.state, "request_id", ""))


def install(app: FastAPI) -> None:
    app.add_exception_handler(KeelError, keel_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(OSError, dependency_unavailable)  # e.g. connection refused on connect
    app.add_exception_handler(Exception, unexpected_error)
