"""Costs: the price book, the cost ledger, usage reports, budgets and their webhooks (docs/costs.md)."""

from keel.costs.budgets import Budget, BudgetExceededError, BudgetStore
from keel.costs.ledger import CostMetrics, CostRecorder
from keel.costs.prices import Cost, Price, PriceBook
from keel.costs.reports import UsageLine, UsageReports
from keel.costs.tracker import CostTracker, Spend
from keel.costs.webhooks import WebhookSender

__all__ = [
    "Budget",
    "BudgetExceededError",
    "BudgetStore",
    "Cost",
    "CostMetrics",
    "CostRecorder",
    "CostTracker",
    "Price",
    "PriceBook",
    "Spend",
    "UsageLine",
    "UsageReports",
    "WebhookSender",
]
