"""The price book: sources in order of precedence, micro-dollars computed by hand."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import genai_prices

from keel.costs import PriceBook
from keel.costs.prices import price_from
from keel.llm import Usage
from keel.settings import ModelConfig, PriceConfig, Settings

USAGE = Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=200)


def _book(make_settings: Callable[..., Settings], models: dict[str, ModelConfig]) -> PriceBook:
    return PriceBook(make_settings(models=models))


def test_a_configured_price_is_per_million_tokens_with_cached_input_apart(
    make_settings: Callable[..., Settings], priced_models: dict[str, ModelConfig]
) -> None:
    cost = _book(make_settings, priced_models).cost(None, "priced", "fake-gpt", USAGE)
    # 800 uncached x $2.50 + 200 cached x $1.25 + 100 output x $10, per million tokens
    assert cost.micros == 800 * 2.5 + 200 * 1.25 + 100 * 10 == 3250
    assert cost.source == "keel.toml"


def test_the_package_prices_openai_and_anthropic_models_from_its_bundled_data(
    make_settings: Callable[..., Settings], priced_models: dict[str, ModelConfig]
) -> None:
    book = _book(make_settings, priced_models)
    gpt = book.cost(None, "gpt4o", None, USAGE)
    assert (gpt.micros, gpt.source) == (3250, f"genai-prices@{genai_prices.__version__}")  # 2.5/1.25/10
    claude = book.cost(None, "claude", None, USAGE)
    assert claude.micros == 800 * 3 + 200 * 0.3 + 100 * 15 == 3960  # claude 3.5 sonnet: 3/0.30/15


def test_a_tenant_price_overrides_the_config_and_the_local_model_is_free(
    make_settings: Callable[..., Settings], priced_models: dict[str, ModelConfig]
) -> None:
    book = _book(make_settings, priced_models)
    tenant = uuid.uuid4()
    book.set_tenant_prices({(tenant, "priced"): price_from(1.0, None, 2.0, "tenant-override")})
    assert book.cost(tenant, "priced", None, USAGE).micros == 1000 * 1 + 100 * 2
    assert book.cost(uuid.uuid4(), "priced", None, USAGE).micros == 3250  # other tenants: keel.toml
    assert book.cost(tenant, "local", None, USAGE).micros == 0
    local = {"local": ModelConfig(provider="local", price=PriceConfig(input=0.1, output=0.2))}
    assert _book(make_settings, priced_models | local).cost(None, "local", None, USAGE).micros == 120


def test_an_unknown_model_costs_nothing_and_says_so(
    make_settings: Callable[..., Settings], priced_models: dict[str, ModelConfig]
) -> None:
    book = _book(make_settings, priced_models)
    assert book.price(None, "fake") is None
    cost = book.cost(None, "fake", "fake-gpt", USAGE)
    assert (cost.micros, cost.source) == (0, "unpriced")


def test_micro_dollars_round_half_up() -> None:
    price = price_from(0.15, None, 0.6, "keel.toml")
    assert price.micros(Usage(3, 0)) == 0  # 0.45
    assert price.micros(Usage(10, 0)) == 2  # 1.5
    assert price.micros(Usage(1, 1)) == 1  # 0.75
