"""`POST /v1/chat/completions` in /openapi.json.

The route is a plain ASGI app served by `GatewayMiddleware` (router.py), so FastAPI does not see it when it
builds the schema. `install_openapi` adds it with the request and response models of protocol.py, so
generated clients, API explorers and schema-driven fuzzers see the main endpoint as they see the others.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from keel.gateway.chat.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorResponse,
)
from keel.gateway.chat.router import CONVERSATION_HEADER, PROMPT_HEADER, TIMEOUT_HEADER

PATH = "/v1/chat/completions"
_REF = "#/components/schemas/{model}"
_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (ChatCompletionRequest, "validation"),
    (ChatCompletion, "validation"),
    (ChatCompletionChunk, "validation"),
    (ErrorResponse, "validation"),
]
_ERRORS = {
    "400": "Bad JSON, a wrong type, an unknown field, a field over its cap (`param` names the field)",
    "401": "Missing, unknown or expired API key",
    "403": "The key lacks the scope, or may not call the model (`model_not_allowed`)",
    "404": "Unknown model (`model_not_found`)",
    "408": "The request body did not arrive within `body_read_timeout_seconds`",
    "413": "The body is over `max_body_bytes`",
    "429": "A tier limit (with `Retry-After`) or the upstream's rate limit",
    "500": "Internal error",
    "502": "The upstream failed",
    "503": "The upstream is unreachable or overloaded, or the local model's queue is full",
    "504": "The upstream timed out",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


def chat_completions_operation() -> dict[str, Any]:
    return {
        "summary": "Create a chat completion",
        "description": (
            'OpenAI Chat Completions. With `"stream": true` the answer is `text/event-stream`: one '
            "`data: {ChatCompletionChunk}` event per chunk, then `data: [DONE]`; an error after the first "
            "byte comes in-band as `data: {ErrorResponse}`."
        ),
        "operationId": "create_chat_completion",
        "security": [{"bearer": []}, {"api_key": []}],
        "parameters": [
            _header(CONVERSATION_HEADER, "The conversation this turn belongs to (or `conversation_id`)."),
            _header(TIMEOUT_HEADER, "Seconds: shortens the model alias's deadline."),
            _header(PROMPT_HEADER, "A registry prompt: NAME, NAME@LABEL or NAME@VERSION (or `prompt`)."),
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(ChatCompletionRequest)}},
        },
        "responses": {
            "200": {
                "description": "The completion; a stream of chunks when the request set `stream`",
                "content": {
                    "application/json": {"schema": _ref(ChatCompletion)},
                    "text/event-stream": {"schema": _ref(ChatCompletionChunk)},
                },
            },
            **{
                status: {
                    "description": text,
                    "content": {"application/json": {"schema": _ref(ErrorResponse)}},
                }
                for status, text in _ERRORS.items()
            },
        },
    }


def add_chat_completions(schema: dict[str, Any]) -> None:
    """Add the path, its models and the two ways to send a key to an OpenAPI schema FastAPI built."""
    _, definitions = models_json_schema(_MODELS, ref_template=_REF)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, definition in definitions["$defs"].items():
        if schemas.setdefault(name, definition) != definition:
            raise ValueError(f"two different schemas are named {name!r} in /openapi.json")
    components.setdefault("securitySchemes", {}).update(
        {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "Authorization: Bearer sk-keel-...",
            },
            "api_key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
    )
    schema["paths"][PATH] = {"post": chat_completions_operation()}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and so /openapi.json) include chat completions; built once, on first use."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            add_chat_completions(build())  # FastAPI's builder keeps its result in app.openapi_schema
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
