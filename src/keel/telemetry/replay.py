"""Replay: send a recorded upstream request again, to the same or another model, and compare."""

from __future__ import annotations

import difflib
import uuid
from typing import Any

from keel.errors import InvalidRequestError, NotFoundError
from keel.llm import ChatRequest, ChatResult
from keel.pipeline import ChatCall, ChatPipeline
from keel.telemetry.audit import PARAMETERS
from keel.telemetry.audit_store import AuditStore


class Replayer:
    def __init__(self, store: AuditStore, pipeline: ChatPipeline) -> None:
        self._store = store
        self._pipeline = pipeline

    async def replay(
        self, tenant_id: uuid.UUID, request_id: str, model: str | None = None, *, audit_content: bool = True
    ) -> dict[str, Any]:
        original = await self._store.get(tenant_id, request_id)
        if original is None:
            raise NotFoundError(f"No request {request_id!r}.", param="request_id")
        recorded = original["request"]
        if recorded.get("messages") is None:
            raise InvalidRequestError(
                "This request was recorded as metadata only (no content), so it cannot be replayed."
            )
        alias = model or original["model"]["answered"] or original["model"]["requested"]
        request = ChatRequest(model=alias, messages=recorded["messages"])
        for name in PARAMETERS:
            if name in recorded:
                setattr(request, name, recorded[name])
        replay_id = f"replay_{uuid.uuid4().hex}"
        # No conversation, no prompt, no retrieval: the pipeline sends these messages exactly as recorded,
        # and records the replay like any other call, linked to the original.
        call = ChatCall(replay_id, tenant_id, request, audit_content=audit_content, replay_of=request_id)
        result = ChatResult()
        events = self._pipeline.stream(call)
        try:
            async for event in events:
                result.add(event)
        finally:
            await events.aclose()
        before = (original["reply"] or {}).get("text") or ""
        after = result.text
        return {
            "object": "keel.replay",
            "original": {
                "id": request_id,
                "model": original["model"]["answered"] or original["model"]["requested"],
                "text": before,
                "usage": original["usage"],
            },
            "replay": {
                "id": replay_id,
                "model": request.trace.answered_by or alias,
                "text": after,
                "finish_reason": result.finish_reason,
                "usage": {
                    "input_tokens": result.usage.input_tokens if result.usage else 0,
                    "output_tokens": result.usage.output_tokens if result.usage else 0,
                },
            },
            "identical": before == after,
            "diff": "".join(
                difflib.unified_diff(
                    before.splitlines(keepends=True), after.splitlines(keepends=True), "original", "replay"
                )
            ),
        }
