"""The price book: what a model call costs, in integer micro-dollars, and where that price came from.

Sources, highest first: the tenant's own price for the alias (`tenant_prices`, set over the API or CLI),
the alias's `price` in keel.toml, the bundled data of the `genai-prices` package (read from the package
itself: Keel never starts its updater, so nothing is fetched at run time). The local model is free unless
configured. A model none of them knows is unpriced: its calls cost 0 and log a warning once per model
(a budgeted tenant is refused instead, by keel.costs.budgets).

Prices are USD per million tokens, which is micro-dollars per token: a call costs
`uncached_input * input + cached_input * cached + output * output` micro-dollars, rounded half up.
The package's rates are looked up once per model and UTC day (its prices can change on a date); a model
with tiered rates (long-context prices) is priced by the package for every call.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from keel.llm import Usage

if TYPE_CHECKING:
    from genai_prices import Usage as PackageUsage
    from genai_prices.types import PriceCalculation
from keel.settings import DEFAULT_BASE_URLS, ModelConfig, Settings

log = logging.getLogger(__name__)

TENANT_OVERRIDE = "tenant-override"
CONFIGURED = "keel.toml"
LOCAL = "local"
UNPRICED = "unpriced"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens; `source` says where the numbers came from (kept in every ledger row)."""

    input: float
    cached_input: float
    output: float
    source: str
    tiered: tuple[str, str] | None = None  # (provider, model): the package prices each call itself

    def micros(self, usage: Usage) -> int:
        if self.tiered is not None:
            return _package_micros(usage, *self.tiered)
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        exact = (
            (usage.input_tokens - cached) * self.input
            + cached * self.cached_input
            + usage.output_tokens * self.output
        )
        return math.floor(exact + 0.5)

    def as_json(self) -> dict[str, object]:
        return {
            "input": self.input,
            "cached_input": self.cached_input,
            "output": self.output,
            "source": self.source,
        }


FREE = Price(0.0, 0.0, 0.0, LOCAL)


def price_from(input: float, cached_input: float | None, output: float, source: str) -> Price:
    return Price(input, input if cached_input is None else cached_input, output, source)


@dataclass(frozen=True, slots=True)
class Cost:
    micros: int
    source: str

    @property
    def usd(self) -> float:
        return self.micros / 1_000_000


class PriceBook:
    """Prices by alias and upstream model. Tenant overrides are handed in by the budgets cache
    (`set_tenant_prices`), which reloads them on every replica when they change."""

    def __init__(self, settings: Settings) -> None:
        self._models = settings.models
        self._tenant: Mapping[tuple[uuid.UUID, str], Price] = {}
        self._package: dict[tuple[str, str, str], tuple[date, Price | None]] = {}
        self._warned: set[str] = set()
        self.package_source = f"genai-prices@{_package_version()}"

    def set_tenant_prices(self, prices: Mapping[tuple[uuid.UUID, str], Price]) -> None:
        self._tenant = prices

    def tenant_prices(self, tenant_id: uuid.UUID) -> dict[str, Price]:
        return {alias: price for (tenant, alias), price in self._tenant.items() if tenant == tenant_id}

    def price(
        self, tenant_id: uuid.UUID | None, alias: str, upstream_model: str | None = None
    ) -> Price | None:
        """The price of a call to `alias` (served by `upstream_model`, the alias's own by default), or
        None when no source knows it."""
        if tenant_id is not None and self._tenant:
            override = self._tenant.get((tenant_id, alias))
            if override is not None:
                return override
        config = self._models.get(alias)
        if config is None:
            return None
        if config.price is not None:
            p = config.price
            return price_from(p.input, p.cached_input, p.output, CONFIGURED)
        if config.provider == "local":
            return FREE
        return self._from_package(config, upstream_model or config.model or alias)

    def cost(self, tenant_id: uuid.UUID | None, alias: str, upstream_model: str | None, usage: Usage) -> Cost:
        """What `usage` costs; an unpriced model costs 0 (source "unpriced") and is logged once."""
        price = self.price(tenant_id, alias, upstream_model)
        if price is None:
            model = upstream_model or alias
            if model not in self._warned:
                self._warned.add(model)
                log.warning("no price for model %r (alias %r): its calls are recorded at $0", model, alias)
            return Cost(0, UNPRICED)
        return Cost(price.micros(usage), price.source)

    def _from_package(self, config: ModelConfig, model: str) -> Price | None:
        base_url = config.upstream_base_url()
        key = (config.provider, base_url, model)
        today = datetime.now(UTC).date()
        cached = self._package.get(key)
        if cached is not None and cached[0] == today:
            return cached[1]
        price = _package_price(config.provider, base_url, model, self.package_source)
        self._package[key] = (today, price)
        return price


def _package_version() -> str:
    import genai_prices

    return str(genai_prices.__version__)


def _lookup(provider: str, base_url: str, model: str, usage: PackageUsage) -> PriceCalculation | None:
    """The package's price calculation for `usage`: by the upstream's URL when it is not the provider's
    default (an OpenAI-compatible server the package knows, say Groq), else by the provider."""
    from genai_prices import calc_price

    if base_url and base_url != DEFAULT_BASE_URLS.get(provider):
        try:
            return calc_price(usage, model, provider_api_url=base_url)
        except LookupError:
            pass
    try:
        return calc_price(usage, model, provider_id=provider)
    except LookupError:
        return None


def _package_price(provider: str, base_url: str, model: str, source: str) -> Price | None:
    from genai_prices import Usage as PackageUsage

    found = _lookup(provider, base_url, model, PackageUsage(input_tokens=0, output_tokens=0))
    if found is None:
        return None
    rates = found.model_price
    values = [getattr(rates, name, None) for name in ("input_mtok", "cache_read_mtok", "output_mtok")]
    if any(value is not None and not isinstance(value, Decimal) for value in values):
        return Price(0.0, 0.0, 0.0, source, tiered=(provider, model))
    input_rate, cached_rate, output_rate = (float(v) if v is not None else None for v in values)
    return price_from(input_rate or 0.0, cached_rate, output_rate or 0.0, source)


def _package_micros(usage: Usage, provider: str, model: str) -> int:
    from genai_prices import Usage as PackageUsage

    counted = PackageUsage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=min(usage.cached_input_tokens, usage.input_tokens),
        output_tokens=usage.output_tokens,
    )
    found = _lookup(provider, "", model, counted)
    if found is None:
        return 0
    return math.floor(found.total_price * 1_000_000 + Decimal("0.5"))
