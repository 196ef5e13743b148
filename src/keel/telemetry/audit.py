"""The audit record of every model call and the usage ledger, written through the write queue.

Built from the pipeline's CallOutcome after the response: what was sent upstream (after assembly), every
attempt, the reply, tokens, timings. Content passes the redactor before it is stored, as the write queue's
`prepare` (in its own process under `keel serve`), never on the event loop: redaction is linear but still
~0.3 s of CPU per MB of adversarial text.
A tenant may ask for metadata only. `user` is stored hashed unless `audit_end_user = "plain"`.
A full queue drops the record and counts it (`keel_write_queue_dropped_total`): never silent, never
blocking the response.
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import UTC, datetime
from typing import Any

from keel.db.tables import audit_requests, usage_ledger
from keel.db.writer import WriteQueue
from keel.errors import KeelError
from keel.llm import Attempt, ChatRequest
from keel.pipeline import CallOutcome, ChatCall
from keel.telemetry.metrics import Metrics
from keel.telemetry.redact import Redactor, hash_end_user, redacted_audit_row

log = logging.getLogger(__name__)

PARAMETERS = ("max_tokens", "temperature", "top_p", "stop", "seed", "user", "tools", "tool_choice")


class AuditRecorder:
    def __init__(
        self,
        writes: WriteQueue,
        metrics: Metrics,
        redactor: Redactor,
        *,
        enabled: bool = True,
        hash_end_user: bool = True,
    ) -> None:
        self._writes = writes
        self._metrics = metrics
        self._redact = functools.partial(redacted_audit_row, redactor)  # picklable: for the writer's process
        self._enabled = enabled
        self._hash_end_user = hash_end_user
        self._dropped_since_log = 0
        self._last_drop_log = 0.0

    def record(self, outcome: CallOutcome) -> None:
        call, sent, result = outcome.call, outcome.sent, outcome.result
        usage = result.usage
        model = sent.trace.answered_by or sent.model
        if usage is not None:
            self._metrics.tokens(model, usage.input_tokens, usage.output_tokens)
        if call.received:
            self._metrics.overhead.observe(max(0.0, outcome.model_started - call.received))
        if not self._enabled:
            return
        created = datetime.fromtimestamp(time.time() - (time.perf_counter() - outcome.started), UTC)
        end_user = hash_end_user(call.tenant_id, sent.user) if self._hash_end_user else sent.user
        row = self._audit_row(outcome, model, created, end_user)
        if not self._writes.put(audit_requests, row, prepare=self._redact):
            self._dropped(call.request_id)
        if usage is not None and not self._writes.put(
            usage_ledger,
            {
                "tenant_id": call.tenant_id,
                "end_user": end_user,
                "model": model,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "estimated": call.usage_estimated,  # no usage arrived: counted from what was streamed
                "request_id": call.request_id,
                "created_at": created,
            },
        ):
            self._dropped(call.request_id)

    def _dropped(self, request_id: str) -> None:
        self._metrics.queue_dropped.inc()
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:  # one line a second, not one per row, during an outage
            log.error(
                "write queue full: dropped audit data of %d rows in the last second (last: request %s)",
                self._dropped_since_log,
                request_id,
            )
            self._dropped_since_log = 0
            self._last_drop_log = now

    def _audit_row(
        self, outcome: CallOutcome, model: str, created: datetime, end_user: str | None
    ) -> dict[str, Any]:
        """The row before redaction (`redacted_audit_row` runs later, off the event loop)."""
        call, sent, result, error = outcome.call, outcome.sent, outcome.result, outcome.error
        content = call.audit_content
        reply = {"text": result.text, "tool_calls": list(result.tool_calls)} if content else None
        request = upstream_request(sent, include_messages=content)
        if "user" in request:
            request["user"] = end_user
        return {
            "request_id": call.request_id,
            "client_request_id": call.client_request_id,
            "trace_id": outcome.trace_id,
            "tenant_id": call.tenant_id,
            "end_user": end_user,
            "conversation_id": call.conversation_id or call.summary_of,
            "prompt": call.prompt or {},
            "model_requested": call.request.model,
            "model_answered": model if error is None else sent.trace.answered_by,
            "deployment": sent.trace.deployment,
            "upstream_model": sent.trace.upstream_model,
            "status": "ok" if error is None else "error",
            "error": None if error is None else _describe(error),
            "attempts": [_attempt_json(a, outcome.started) for a in sent.trace.attempts],
            "request": request,
            # what went into the context (after the token share), so a reader and replay see the sources
            "retrieved": [c.source_json(i + 1) for i, c in enumerate(outcome.call.sources)],
            "reply": reply,
            "finish_reason": result.finish_reason if error is None else None,
            "input_tokens": result.usage.input_tokens if result.usage else 0,
            "output_tokens": result.usage.output_tokens if result.usage else 0,
            "usage_estimated": call.usage_estimated,
            "latency_ms": round((outcome.finished - outcome.started) * 1000, 3),
            "ttft_ms": round((outcome.first_event - outcome.started) * 1000, 3)
            if outcome.first_event
            else None,
            "stages": outcome.stages,
            "replay_of": call.replay_of,
            "context": _context_json(call),
            "created_at": created,
        }


def _context_json(call: ChatCall) -> dict[str, Any] | None:
    """The context decision (which stored messages were sent, which summary), and what kind of call."""
    if call.context is None:
        return {"kind": call.kind} if call.kind != "chat" else None
    return {"kind": call.kind, **call.context.as_json()}


def upstream_request(sent: ChatRequest, *, include_messages: bool = True) -> dict[str, Any]:
    """The request as it went upstream after assembly: what a replay sends again."""
    body: dict[str, Any] = {"model": sent.model}
    body["messages"] = list(sent.messages) if include_messages else None
    for name in PARAMETERS:
        value = getattr(sent, name)
        if value not in (None, []):
            body[name] = value
    return body


def _describe(error: BaseException) -> str:
    if isinstance(error, KeelError):
        return f"{error.type}: {error.message}"
    return type(error).__name__  # a cancelled stream (client gone) and the like


def _attempt_json(attempt: Attempt, origin: float) -> dict[str, Any]:
    # Field by field: dataclasses.asdict deep-copies every value, and this runs on every request.
    first = attempt.first_token
    return {
        "model": attempt.model,
        "deployment": attempt.deployment,
        "provider": attempt.provider,
        "upstream_model": attempt.upstream_model,
        "status": attempt.status,
        "error_type": attempt.error_type,
        "started_ms": round((attempt.started - origin) * 1000, 3),
        "latency_ms": round(attempt.latency * 1000, 3),
        "first_token_ms": round(first * 1000, 3) if first is not None else None,
    }
