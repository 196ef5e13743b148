"""The cost ledger: a row per upstream attempt that consumed tokens, in integer micro-dollars, written
through the write queue like audit rows (never on the request's critical path).

Which attempts consumed tokens: Keel retries and falls back only before an attempt's first event
(keel.llm.resilience), and an attempt that failed before its first event was refused by the upstream and
is not billed. So the tokens of a call are the usage of its last attempt, the one that answered or that
failed mid-stream (then the pipeline estimates what was used, `estimated`). Other layers that call models
(summaries, embeddings, judges) write their own rows with `record_usage`.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from keel.costs.prices import Cost, PriceBook
from keel.costs.tracker import CostTracker
from keel.db.tables import cost_ledger
from keel.db.writer import WriteQueue
from keel.llm import Usage
from keel.pipeline import CallOutcome
from keel.telemetry.metrics import Children, Metrics
from keel.telemetry.redact import hash_end_user

log = logging.getLogger(__name__)


class CostMetrics:
    """`keel_cost_usd_total` by tenant tier and alias (bounded labels), budget alerts by period."""

    def __init__(self, metrics: Metrics) -> None:
        self.cost = Counter(
            "keel_cost_usd_total", "Model spend in USD.", ["tier", "alias"], registry=metrics.registry
        )
        self.alerts = Counter(
            "keel_budget_alerts_total",
            "Soft budget thresholds crossed.",
            ["period"],
            registry=metrics.registry,
        )
        self._cost = Children(self.cost)
        self.dropped = metrics.queue_dropped

    def spent(self, tier: str, alias: str, micros: int) -> None:
        if micros:
            self._cost(tier, alias).inc(micros / 1_000_000)


class CostRecorder:
    """A pipeline recorder: prices the call's usage, queues its ledger row, and tells the request's
    Spend what it cost (the budget is settled with it)."""

    def __init__(
        self,
        writes: WriteQueue,
        tracker: CostTracker,
        metrics: CostMetrics | None = None,
        *,
        hash_end_users: bool = True,
    ) -> None:
        self._writes = writes
        self._tracker = tracker
        self._prices: PriceBook = tracker.prices
        self._metrics = metrics
        self._hash_end_users = hash_end_users

    def record(self, outcome: CallOutcome) -> None:
        call, sent = outcome.call, outcome.sent
        spend = self._tracker.current(call.request_id)
        usage = call.usage
        if usage is None or not (usage.input_tokens or usage.output_tokens):
            return
        attempts = sent.trace.attempts
        last = attempts[-1] if attempts else None
        alias = last.model if last is not None else sent.model
        upstream = last.upstream_model if last is not None else sent.model
        cost = self._prices.cost(call.tenant_id, alias, upstream, usage)
        if spend is not None:
            spend.cost += cost.micros
            key_id, tier, end_user = spend.principal.key_id, spend.principal.tier, spend.end_user
        else:  # a call made without a gateway request (a replay from the CLI)
            key_id, tier = None, "none"
            end_user = hash_end_user(call.tenant_id, sent.user) if self._hash_end_users else sent.user
        prompt = call.prompt or {}
        row = {
            "created_at": datetime.fromtimestamp(time.time() - (time.perf_counter() - outcome.started), UTC),
            "tenant_id": call.tenant_id,
            "key_id": key_id,
            "end_user": end_user,
            "kind": "chat",
            "alias": alias,
            "provider": last.provider if last is not None else "",
            "upstream_model": upstream,
            "deployment": last.deployment if last is not None else None,
            "attempt": max(1, len(attempts)),
            "input_tokens": usage.input_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "output_tokens": usage.output_tokens,
            "estimated": call.usage_estimated,
            "cost_micros": cost.micros,
            "price_source": cost.source,
            "prompt_name": prompt.get("name"),
            "prompt_version": prompt.get("version"),
            "conversation_id": call.conversation_id,
            "request_id": call.request_id,
        }
        self._put(row)
        if self._metrics is not None:
            self._metrics.spent(tier, alias, cost.micros)

    def record_usage(
        self,
        *,
        kind: str,
        tenant_id: uuid.UUID,
        alias: str,
        usage: Usage,
        request_id: str,
        provider: str = "",
        upstream_model: str | None = None,
        key_id: uuid.UUID | None = None,
        conversation_id: str | None = None,
        tier: str = "none",
    ) -> Cost:
        """A row for a model call outside chat completions: a summary, an embedding, a judge."""
        cost = self._prices.cost(tenant_id, alias, upstream_model, usage)
        self._put(
            {
                "created_at": datetime.now(UTC),
                "tenant_id": tenant_id,
                "key_id": key_id,
                "end_user": None,
                "kind": kind,
                "alias": alias,
                "provider": provider,
                "upstream_model": upstream_model or alias,
                "deployment": None,
                "attempt": 1,
                "input_tokens": usage.input_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "output_tokens": usage.output_tokens,
                "estimated": False,
                "cost_micros": cost.micros,
                "price_source": cost.source,
                "prompt_name": None,
                "prompt_version": None,
                "conversation_id": conversation_id,
                "request_id": request_id,
            }
        )
        if self._metrics is not None:
            self._metrics.spent(tier, alias, cost.micros)
        return cost

    def _put(self, row: dict[str, Any]) -> None:
        if not self._writes.put(cost_ledger, row):
            if self._metrics is not None:
                self._metrics.dropped.inc()
            log.error("write queue full: dropped the cost ledger row of request %s", row["request_id"])
