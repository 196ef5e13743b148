"""Costs at run time: each request's `Spend` (who pays, its budget reservation, what it cost), the cache
of budgets and tenant prices, and the loops that keep it fresh and free dead replicas' reservations.

The hot path for a tenant without a budget touches no database: which tenants have budgets is cached in
memory and reloaded on every replica when `costs_version` moves (polled every `refresh_seconds`, 0.5 s by
default; the replica that made the change reloads at once).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from keel.costs.budgets import Budget, BudgetExceededError, BudgetStore, Hold, window
from keel.costs.prices import Cost, PriceBook
from keel.costs.webhooks import WebhookSender
from keel.errors import PermissionDeniedError
from keel.llm import ChatRequest, Usage
from keel.ratelimit import prompt_tokens
from keel.settings import Settings
from keel.telemetry.redact import hash_end_user
from keel.tenants import Principal

log = logging.getLogger(__name__)


class Spend:
    """One request's money. Made by `CostTracker.open`; the ledger recorder fills `cost`; `settle()`
    (always, however the request ended) moves it into the budgets and forgets the request."""

    __slots__ = ("_tracker", "cost", "end_user", "holds", "lease", "principal", "request_id", "reserved")

    def __init__(
        self, tracker: CostTracker, principal: Principal, request_id: str, end_user: str | None
    ) -> None:
        self._tracker = tracker
        self.principal = principal
        self.request_id = request_id
        self.end_user = end_user
        self.holds: list[Hold] = []
        self.lease: uuid.UUID | None = None
        self.reserved = 0
        self.cost = 0  # micro-dollars, summed over the request's ledger rows

    def cost_of(self, alias: str, upstream_model: str | None, usage: Usage | None) -> Cost | None:
        """What the answer cost, for the response (header and `cost` field); None when no usage came."""
        if usage is None:
            return None
        return self._tracker.prices.cost(self.principal.tenant_id, alias, upstream_model, usage)

    async def settle(self) -> None:
        """Never raises: it runs in `finally` blocks. The lease expires if this cannot reach PostgreSQL."""
        await self._tracker.settle(self)


class CostTracker:
    def __init__(
        self,
        store: BudgetStore,
        prices: PriceBook,
        settings: Settings,
        *,
        webhooks: WebhookSender | None = None,
        on_alert: Callable[[Budget, int], None] | None = None,
    ) -> None:
        self.store = store
        self.prices = prices
        self._settings = settings.costs
        self._models = settings.models
        self._default_completion = settings.default_completion_tokens_estimate
        self._hash_users = settings.audit_end_user == "hash"
        self._webhooks = webhooks
        self._on_alert = on_alert
        self._budgets: dict[uuid.UUID, list[Budget]] = {}
        self._version = -1
        self._open: dict[str, Spend] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        await self.reload()
        if background:
            self._tasks = [
                asyncio.create_task(self._refresh_forever(), name="keel-costs-refresh"),
                asyncio.create_task(self._reap_forever(), name="keel-costs-reaper"),
            ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self) -> None:
        version, budgets, tenant_prices = await self.store.load()
        by_tenant: dict[uuid.UUID, list[Budget]] = defaultdict(list)
        for budget in budgets:
            by_tenant[budget.tenant_id].append(budget)
        self._budgets = dict(by_tenant)
        self.prices.set_tenant_prices(tenant_prices)
        self._version = version

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.refresh_seconds)
            try:
                if await self.store.version() != self._version:
                    await self.reload()
            except Exception:  # the database may be away for a while; the cache stays as it was
                log.warning("costs: reloading budgets and prices failed", exc_info=True)

    async def _reap_forever(self) -> None:
        period = min(5.0, max(0.2, self._settings.lease_seconds / 4))
        while True:
            await asyncio.sleep(period)
            try:
                freed = await self.store.reap()
                if freed:
                    log.warning("costs: freed expired budget reservations of %d budget windows", freed)
            except Exception:
                log.warning("costs: freeing expired budget reservations failed", exc_info=True)

    # --- per request -------------------------------------------------------------------------------

    def has_budgets(self, tenant_id: uuid.UUID) -> bool:
        return tenant_id in self._budgets

    def budgets_of(self, tenant_id: uuid.UUID) -> list[Budget]:
        return self._budgets.get(tenant_id, [])

    def current(self, request_id: str) -> Spend | None:
        return self._open.get(request_id)

    async def open(self, principal: Principal, request: ChatRequest, request_id: str) -> Spend:
        """The request's Spend; when budgets apply, its estimate is reserved against all of them first
        (refused: `BudgetExceededError`, nothing reserved)."""
        end_user = hash_end_user(principal.tenant_id, request.user) if self._hash_users else request.user
        spend = Spend(self, principal, request_id, end_user)
        budgets = self._budgets.get(principal.tenant_id)
        if budgets:
            applying = [b for b in budgets if b.key_id is None or b.key_id == principal.key_id]
            if applying:
                await self._reserve(spend, applying, request)
        self._open[request_id] = spend
        return spend

    def estimate(self, principal: Principal, request: ChatRequest) -> int:
        """Micro-dollars reserved before the call: the whole prompt and the reply's cap, the reply's part
        capped at `estimate_max_output_tokens` so one huge max_tokens does not block a tenant."""
        price = self.prices.price(principal.tenant_id, request.model)
        if price is None:
            raise PermissionDeniedError(
                f"Model {request.model!r} has no price, and tenant {principal.tenant!r} has a budget: "
                "calls to it cannot be counted against the budget. Configure a price for the alias "
                "(price = {input = ..., output = ...} in keel.toml) or a tenant price.",
                param="model",
                code="model_not_priced",
            )
        config = self._models.get(request.model)
        cap = config.max_output_tokens if config is not None else None
        output = request.max_tokens or cap or self._default_completion
        output = min(output, self._settings.estimate_max_output_tokens)
        return price.micros(Usage(prompt_tokens(request), output))

    async def _reserve(self, spend: Spend, budgets: list[Budget], request: ChatRequest) -> None:
        amount = self.estimate(spend.principal, request)
        if amount == 0:
            return  # a free model: nothing to count, nothing to refuse
        now = datetime.now(UTC)
        holds = []
        for budget in sorted(budgets, key=lambda b: b.id):  # one lock order on every replica
            start, resets = window(budget.period, now)
            subject = (spend.end_user or "") if budget.per_end_user else ""
            holds.append(Hold(budget, start, subject, resets))
        lease = uuid.uuid4()
        refused = await self.store.reserve(lease, holds, amount, self._settings.lease_seconds)
        if refused is not None:
            await self._refuse(spend.principal, refused, amount, now)
        spend.holds, spend.lease, spend.reserved = holds, lease, amount

    async def _refuse(self, principal: Principal, hold: Hold, amount: int, now: datetime) -> None:
        spent, reserved = await self.store.usage(hold)
        limit = hold.budget.limit_micros
        who = f" for end user {hold.subject!r}" if hold.budget.per_end_user else ""
        seconds = max(1, int((hold.resets - now).total_seconds()))
        raise BudgetExceededError(
            f"Budget exceeded: the {hold.budget.describe()} of tenant {principal.tenant!r}{who} "
            f"(${limit / 1e6:.2f}) has ${spent / 1e6:.4f} spent and ${reserved / 1e6:.4f} reserved; this "
            f"request needs up to ${amount / 1e6:.4f}. It resets at {hold.resets:%Y-%m-%dT%H:%M:%SZ}.",
            headers={"retry-after": str(seconds), "x-keel-budget-reset": f"{hold.resets:%Y-%m-%dT%H:%M:%SZ}"},
        )

    async def settle(self, spend: Spend) -> None:
        self._open.pop(spend.request_id, None)
        if spend.lease is None:
            return
        lease, spend.lease = spend.lease, None
        try:
            spent = await self.store.settle(lease, spend.holds, spend.cost)
            await self._soft_thresholds(spend, spent)
        except Exception:  # the lease expires and frees the reservation; the cost is in the ledger
            log.exception("costs: settling request %s failed", spend.request_id)

    async def _soft_thresholds(self, spend: Spend, spent: dict[uuid.UUID, int]) -> None:
        for hold in spend.holds:
            budget = hold.budget
            after = spent.get(budget.id)
            if after is None or not budget.soft_percents or not budget.limit_micros:
                continue
            before = after - spend.cost
            for percent in budget.soft_percents:
                line = budget.limit_micros * percent // 100
                if before < line <= after and await self.store.alert_once(hold, percent):
                    self._alert(spend, hold, percent, after)

    def _alert(self, spend: Spend, hold: Hold, percent: int, spent: int) -> None:
        budget = hold.budget
        log.warning(
            "budget threshold: %s of tenant %s passed %d%% ($%.4f of $%.2f)",
            budget.describe(),
            spend.principal.tenant,
            percent,
            spent / 1e6,
            budget.limit_micros / 1e6,
        )
        if self._on_alert is not None:
            self._on_alert(budget, percent)
        if self._webhooks is not None:
            self._webhooks.send(
                {
                    "type": "budget.threshold",
                    "tenant": spend.principal.tenant,
                    "tenant_id": str(budget.tenant_id),
                    "budget": budget.as_json(),
                    "end_user": hold.subject or None,
                    "window_start": hold.window_start.isoformat(),
                    "resets_at": f"{hold.resets:%Y-%m-%dT%H:%M:%SZ}",
                    "percent": percent,
                    "spent_usd": spent / 1_000_000,
                }
            )
