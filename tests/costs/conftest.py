"""Costs fixtures: aliases with known prices on the FakeUpstream, and reading the ledger back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from keel.settings import ModelConfig, PriceConfig
from keel.testing import FakeUpstream


@pytest.fixture
def priced_models(fake: FakeUpstream) -> dict[str, ModelConfig]:
    """`fake` (unpriced: fake-gpt is in no price list), `priced` (keel.toml prices), `gpt4o` (priced by
    genai-prices), `claude` (Anthropic, priced by genai-prices)."""
    return {
        "fake": ModelConfig(provider="openai", base_url=fake.openai_base_url, model="fake-gpt"),
        "priced": ModelConfig(
            provider="openai",
            base_url=fake.openai_base_url,
            model="fake-gpt",
            price=PriceConfig(input=2.5, cached_input=1.25, output=10.0),
        ),
        "gpt4o": ModelConfig(provider="openai", base_url=fake.openai_base_url, model="gpt-4o"),
        "claude": ModelConfig(
            provider="anthropic", base_url=fake.base_url, model="claude-3-5-sonnet-latest", api_key="sk-ant-t"
        ),
    }


Fetch = Callable[..., list[Any]]


@pytest.fixture
def fetch(database_url: str) -> Fetch:
    """`fetch(query, *args, until=bool)`: rows of `query`, polled until `until(rows)` (the write queue
    flushes within ~0.1 s)."""
    return lambda query, *args, until=bool: _fetch(database_url, query, *args, until=until)


def _fetch(database_url: str, query: str, *args: Any, until: Callable[[list[Any]], bool]) -> list[Any]:
    async def poll() -> list[Any]:
        conn = await asyncpg.connect(database_url)
        try:
            deadline = time.monotonic() + 10
            while True:
                rows = await conn.fetch(query, *args)
                if until(rows) or time.monotonic() > deadline:
                    return list(rows)
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    return asyncio.run(poll())
