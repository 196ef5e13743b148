"""A Keel with a matrix of aliases in front of two FakeUpstreams (the primary `fake` and `backup`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from keel.settings import ModelConfig, RetryConfig, Settings
from keel.testing import FakeUpstream, unused_base_url
from keel.testing.server import KeelServer

from ._support import openai_alias


@pytest.fixture(scope="session")
def backup() -> Iterator[FakeUpstream]:
    """A second upstream, for the fallback aliases."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_backup(backup: FakeUpstream) -> None:
    backup.reset()


def matrix_models(fake: FakeUpstream, backup: FakeUpstream) -> dict[str, ModelConfig]:
    primary = fake.openai_base_url
    return {
        "primary": openai_alias(primary, "fake-gpt", fallbacks=["backup"]),
        "backup": openai_alias(backup.openai_base_url, "backup-gpt"),
        "patient": openai_alias(primary, "fake-gpt", fallbacks=["backup"], retry=RetryConfig()),
        "refused": openai_alias(unused_base_url(), "nowhere-gpt", fallbacks=["backup"]),
        "claude": openai_alias(fake.base_url, "claude-test", provider="anthropic", fallbacks=["backup"]),
        "short": openai_alias(
            primary, "short-gpt", context_window=4_096, fallbacks=["backup", "mid", "long"]
        ),
        "mid": openai_alias(backup.openai_base_url, "mid-gpt", context_window=2_048),
        "long": openai_alias(backup.openai_base_url, "long-gpt", context_window=128_000),
    }


@pytest.fixture(scope="module")
def matrix(
    make_settings: Callable[..., Settings], fake: FakeUpstream, backup: FakeUpstream
) -> Iterator[KeelServer]:
    settings = make_settings(models=matrix_models(fake, backup), default_model="primary")
    with KeelServer(settings) as server:
        yield server


@pytest.fixture
def client(
    matrix: KeelServer, make_tenant: Callable[..., Any], make_client: Callable[..., openai.OpenAI]
) -> openai.OpenAI:
    return make_client(matrix, make_tenant().chat_key)
