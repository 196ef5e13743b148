"""Replay: send a recorded upstream request again, to the same or another model, and compare."""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.errors import InvalidRequestError, NotFoundError
from keel.llm import ChatRequest, ChatResult
from keel.pipeline import ChatCall, ChatPipeline
from keel.telemetry.audit import PARAMETERS
from keel.telemetry.audit_store import AuditStore


@dataclass(slots=True)
class Replay:
    """A replay ready to run: the original record and the call that sends its request again."""

    original: dict[str, Any]
    call: ChatCall


class Replayer:
    """`prepare` then run `replay.call` (the gateway runs it under the caller's rate limits), then
    `compare`; `replay` does all three with no limits (the operator's CLI)."""

    def __init__(self, store: AuditStore, pipeline: ChatPipeline) -> None:
        self._store = store
        self._pipeline = pipeline

    async def replay(
        self,
        tenant_id: uuid.UUID,
        request_id: str,
        model: str | None = None,
        *,
        audit_content: bool = True,
        check_model: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        replay = await self.prepare(
            tenant_id, request_id, model, audit_content=audit_content, check_model=check_model
        )
        result = ChatResult()
        events = self._pipeline.stream(replay.call)
        try:
            async for event in events:
                result.add(event)
        finally:
            await events.aclose()
        return compare(replay, result)

    async def prepare(
        self,
        tenant_id: uuid.UUID,
        request_id: str,
        model: str | None = None,
        *,
        audit_content: bool = True,
        check_model: Callable[[str], None] | None = None,
    ) -> Replay:
        """`check_model`: the caller's model permission (`Principal.require_model`), checked like chat's."""
        original = await self._store.get(tenant_id, request_id)
        if original is None:
            raise NotFoundError(f"No request {request_id!r}.", param="request_id")
        recorded = original["request"]
        if recorded.get("messages") is None:
            raise InvalidRequestError(
                "This request was recorded as metadata only (no content), so it cannot be replayed."
            )
        alias = model or original["model"]["answered"] or original["model"]["requested"]
        if check_model is not None:  # before any limit is reserved; the pipeline checks again
            check_model(alias)
        request = ChatRequest(model=alias, messages=recorded["messages"])
        for name in PARAMETERS:
            if name in recorded:
                setattr(request, name, recorded[name])
        # No conversation, no prompt, no retrieval: the pipeline sends these messages exactly as recorded,
        # and records the replay like any other call, linked to the original.
        call = ChatCall(
            f"replay_{uuid.uuid4().hex}",
            tenant_id,
            request,
            audit_content=audit_content,
            replay_of=original["id"],  # Keel's id, also when the caller named the client's
            check_model=check_model,
        )
        return Replay(original, call)


def compare(replay: Replay, result: ChatResult) -> dict[str, Any]:
    """The replay's answer next to the original's, with a unified diff of their texts."""
    original, call = replay.original, replay.call
    before = (original["reply"] or {}).get("text") or ""
    after = result.text
    usage = call.usage or result.usage
    return {
        "object": "keel.replay",
        "original": {
            "id": original["id"],
            "model": original["model"]["answered"] or original["model"]["requested"],
            "text": before,
            "usage": original["usage"],
        },
        "replay": {
            "id": call.request_id,
            "model": call.request.trace.answered_by or call.request.model,
            "text": after,
            "finish_reason": result.finish_reason,
            "usage": {
                "input_tokens": usage.input_tokens if usage else 0,
                "output_tokens": usage.output_tokens if usage else 0,
                "estimated": call.usage_estimated,
            },
        },
        "identical": before == after,
        "diff": "".join(
            difflib.unified_diff(
                before.splitlines(keepends=True), after.splitlines(keepends=True), "original", "replay"
            )
        ),
    }
