"""Costs, composed once for `create_app`'s lifespan (and the CLI commands that build the app's parts)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from keel.costs.budgets import BudgetStore
from keel.costs.ledger import CostMetrics, CostRecorder
from keel.costs.prices import PriceBook
from keel.costs.reports import UsageReports
from keel.costs.tracker import CostTracker
from keel.costs.webhooks import WebhookSender
from keel.db.writer import WriteQueue
from keel.llm.http import HttpClient
from keel.settings import Settings
from keel.telemetry.metrics import Metrics


@dataclass(frozen=True, slots=True)
class Costs:
    tracker: CostTracker
    recorder: CostRecorder
    reports: UsageReports


async def start_costs(
    settings: Settings,
    stack: AsyncExitStack,
    engine: AsyncEngine,
    writes: WriteQueue,
    client: HttpClient,
    metrics: Metrics,
    *,
    serving: bool = False,
) -> Costs | None:
    """None when `costs.enabled` is off. Serving, the cache refresh and the lease reaper run in the
    background; elsewhere (a CLI replay) budgets and prices are read once."""
    config = settings.costs
    if not config.enabled:
        return None
    webhooks = None
    if config.webhook_url:
        secret = config.webhook_secret.get_secret_value() if config.webhook_secret else ""
        webhooks = WebhookSender(
            client,
            config.webhook_url,
            secret,
            attempts=config.webhook_attempts,
            backoff=config.webhook_backoff_seconds,
        )
        stack.push_async_callback(webhooks.aclose)
    cost_metrics = CostMetrics(metrics)
    tracker = CostTracker(
        BudgetStore(engine),
        PriceBook(settings),
        settings,
        webhooks=webhooks,
        on_alert=lambda budget, _percent: cost_metrics.alerts.labels(budget.period).inc(),
    )
    await tracker.start(background=serving)
    stack.push_async_callback(tracker.aclose)
    recorder = CostRecorder(writes, tracker, cost_metrics, hash_end_users=settings.audit_end_user == "hash")
    return Costs(tracker, recorder, UsageReports(engine))
