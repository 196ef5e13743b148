"""Conversations as a product API (chat or admin keys, the key's tenant only): list, read, update, delete,
export. See `keel.context.catalog` for what each does to the data.

A request may name an end user (`?user=`): a conversation bound to another end user is then a 404, as
another tenant's is. Admin keys see every conversation of their tenant. `POST /v1/conversations/{id}`
is the same update as `PATCH`, as the official `openai` SDK sends it (`client.conversations.update`).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from keel.context.catalog import MAX_PAGE, MAX_USER_CHARS, validated_metadata
from keel.errors import InvalidRequestError, NotFoundError
from keel.gateway.audit_routes import _time as time_param
from keel.gateway.deps import ComponentsDep, PrincipalDep
from keel.tenants import Principal

router = APIRouter()

User = Annotated[
    str | None,
    Query(max_length=MAX_USER_CHARS, description="The end user this request acts for."),
]


class ConversationUpdate(BaseModel):
    """Fields left out are left as they are; caps are checked (and named) by the catalog."""

    model_config = ConfigDict(extra="forbid")
    title: Any = None
    metadata: Any = None
    user: Any = None


def _json(body: dict[str, Any]) -> Response:
    """Serialized once by orjson: a long conversation's messages skip FastAPI's encoder."""
    return Response(orjson.dumps(body), media_type="application/json")


def _viewer(principal: Principal, user: str | None) -> str | None:
    """The end user whose binding applies: none for admin keys, which see the whole tenant."""
    return None if principal.scope == "admin" else user


def _missing(conversation_id: str) -> NotFoundError:
    # another tenant's conversation, or one bound to another end user, is indistinguishable from a missing one
    return NotFoundError(f"No conversation {conversation_id[:200]!r}.", param="conversation_id")


def _metadata_filter(request: Request, metadata: str | None) -> dict[str, str] | None:
    """`metadata[key]=value` pairs, or `metadata` as a JSON object; both may be given."""
    pairs: Any = {}
    if metadata is not None:
        try:
            pairs = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            pairs = None
        if not isinstance(pairs, dict):
            raise InvalidRequestError("'metadata' must be a JSON object of strings.", param="metadata")
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            pairs[name[len("metadata[") : -1]] = value
    return validated_metadata(pairs) if pairs else None


@router.get("/v1/conversations")
async def list_conversations(
    request: Request,
    principal: PrincipalDep,
    keel: ComponentsDep,
    user: User = None,
    metadata: Annotated[
        str | None, Query(max_length=8192, description='JSON, e.g. {"k":"v"}; or metadata[k]=v')
    ] = None,
    updated_since: Annotated[str | None, Query(description="ISO 8601 or Unix seconds")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Annotated[
        str | None, Query(max_length=1024, description="next_cursor of the previous page")
    ] = None,
) -> dict[str, Any]:
    """Newest update first; `user` lists the conversations bound to that end user."""
    found, cursor = await keel.catalog.list(
        principal.tenant_id,
        user=user,
        metadata=_metadata_filter(request, metadata),
        updated_since=time_param(updated_since, "updated_since"),
        limit=limit,
        after=after,
    )
    return {
        "object": "list",
        "data": found,
        "first_id": found[0]["id"] if found else None,
        "last_id": found[-1]["id"] if found else None,
        "has_more": cursor is not None,
        "next_cursor": cursor,
    }


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(
    conversation_id: str, principal: PrincipalDep, keel: ComponentsDep, user: User = None
) -> Response:
    """The conversation, its messages (`messages` as OpenAI messages, `items` with their ids, token
    counts and times) and its newest summary (or null)."""
    found = await keel.catalog.get(principal.tenant_id, conversation_id, user=_viewer(principal, user))
    if found is None:
        raise _missing(conversation_id)
    return _json(found)


@router.patch("/v1/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str,
    body: ConversationUpdate,
    principal: PrincipalDep,
    keel: ComponentsDep,
    user: User = None,
) -> dict[str, Any]:
    """Title, metadata (replaced whole) or the end user it is bound to (bound once; admin keys rebind)."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    if not changes:
        raise InvalidRequestError("Nothing to update: give title, metadata or user.")
    found = await keel.catalog.update(
        principal.tenant_id,
        conversation_id,
        changes,
        user=_viewer(principal, user),
        rebind=principal.scope == "admin",
    )
    if found is None:
        raise _missing(conversation_id)
    return found


@router.post("/v1/conversations/{conversation_id}", operation_id="update_conversation_post")
async def update_conversation_post(
    conversation_id: str,
    body: ConversationUpdate,
    principal: PrincipalDep,
    keel: ComponentsDep,
    user: User = None,
) -> dict[str, Any]:
    """The same update as PATCH: the `openai` SDK's `conversations.update` sends POST."""
    return await update_conversation(conversation_id, body, principal, keel, user)


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(
    conversation_id: str, principal: PrincipalDep, keel: ComponentsDep, user: User = None
) -> dict[str, Any]:
    """Its messages and summaries go, and the content of its audit records (their metadata stays)."""
    if not await keel.catalog.delete(principal.tenant_id, conversation_id, user=_viewer(principal, user)):
        raise _missing(conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/v1/conversations/{conversation_id}/export")
async def export_conversation(
    conversation_id: str, principal: PrincipalDep, keel: ComponentsDep, user: User = None
) -> Response:
    """Everything stored for it, as JSON: the conversation, every message, every summary version."""
    found = await keel.catalog.export(principal.tenant_id, conversation_id, user=_viewer(principal, user))
    if found is None:
        raise _missing(conversation_id)
    return _json(found)
