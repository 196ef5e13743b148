"""The audit API (admin scope, the key's tenant only): find a request, page through them, replay one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from keel.errors import InvalidRequestError, NotFoundError
from keel.gateway.deps import AdminDep, ComponentsDep
from keel.gateway.disconnect import watch_disconnect
from keel.telemetry.audit_store import MAX_PAGE
from keel.telemetry.replay import compare

router = APIRouter()


def _time(value: str | None, name: str) -> datetime | None:
    """ISO 8601 or Unix seconds."""
    if value is None:
        return None
    try:
        if value.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(value), UTC)
        parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError, OSError):  # OverflowError, OSError: seconds beyond a datetime
        raise InvalidRequestError(f"'{name}' must be ISO 8601 or Unix seconds.", param=name) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("/v1/requests/{request_id}")
async def get_request(request_id: str, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    record = await keel.audit.get(principal.tenant_id, request_id)
    if record is None:  # another tenant's request is indistinguishable from a missing one
        raise NotFoundError(f"No request {request_id!r}.", param="request_id")
    return record


@router.get("/v1/requests")
async def list_requests(
    principal: AdminDep,
    keel: ComponentsDep,
    conversation_id: str | None = None,
    model: str | None = None,
    status: Annotated[str | None, Query(pattern="^(ok|error)$")] = None,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
) -> dict[str, Any]:
    records, cursor = await keel.audit.page(
        principal.tenant_id,
        conversation_id=conversation_id,
        model=model,
        status=status,
        since=_time(since, "since"),
        until=_time(until, "until"),
        limit=limit,
        after=after,
    )
    return {"object": "list", "data": records, "has_more": cursor is not None, "next_cursor": cursor}


class ReplayBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None


@router.post("/v1/requests/{request_id}/replay")
async def replay_request(
    request_id: str,
    principal: AdminDep,
    keel: ComponentsDep,
    request: Request,
    body: ReplayBody | None = None,
) -> dict[str, Any]:
    """A model call like a chat completion: the same rate limits (requests, tokens, concurrency) and
    model permissions, and it stops when its client leaves."""
    lease = await keel.chat.admit(principal)
    try:
        # FastAPI has read the body: the next message can only be the client leaving.
        async with watch_disconnect(request.receive):
            replay = await keel.replayer.prepare(
                principal.tenant_id,
                request_id,
                body.model if body else None,
                audit_content=principal.audit_content,
                check_model=principal.require_model,
            )
            result = await keel.chat.collect(principal, replay.call, lease)
    finally:
        if lease is not None:  # already released, unless the replay failed before its call
            await lease.release()
    return compare(replay, result)
