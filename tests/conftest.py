"""Shared fixtures: a real PostgreSQL database per session, a real FakeUpstream, real Keel servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import openai
import pytest

from keel.db.engine import create_engine
from keel.settings import ModelConfig, Settings
from keel.tenants import TenantService
from keel.testing import FakeUpstream
from keel.testing.server import KeelServer

T = TypeVar("T")

# The machine's PostgreSQL (no pgvector needed for these tests); override for another server.
PG_ADMIN_URL = os.environ.get("KEEL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"keel_test_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_admin(f"CREATE DATABASE {name}"))
    except OSError as exc:
        pytest.fail(
            f"These tests need the PostgreSQL at {PG_ADMIN_URL} ({exc}); start it or set KEEL_TEST_PG_URL."
        )
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def keel_cli(database_url: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The `keel` command as users run it, on the session's database; `tmp_path` is its data directory,
    and `tmp_path/keel.toml`, once a test writes it, its config file."""

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KEEL_DATABASE_URL": database_url, "KEEL_DATA_DIR": str(tmp_path)}
        if (tmp_path / "keel.toml").exists():
            env["KEEL_CONFIG"] = str(tmp_path / "keel.toml")
        done = subprocess.run(
            [sys.executable, "-m", "keel", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check:
            assert done.returncode == 0, done.stderr
        return done

    return run


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> None:
    fake.reset()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keel")


@pytest.fixture(scope="session")
def make_settings(database_url: str, fake: FakeUpstream, session_dir: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "data_dir": session_dir,
            "log_level": "WARNING",
            "models": {
                "fake": ModelConfig(provider="openai", base_url=fake.openai_base_url, model="fake-gpt"),
                "claude": ModelConfig(
                    provider="anthropic", base_url=fake.base_url, model="claude-test", api_key="sk-ant-test"
                ),
            },
            "default_model": "fake",
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture(scope="session")
def keel(make_settings: Callable[..., Settings]) -> Iterator[KeelServer]:
    with KeelServer(make_settings()) as server:
        yield server


@pytest.fixture
def start_keel(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., KeelServer]]:
    """Start extra Keel servers with their own settings; all stop at the end of the test."""
    started: list[KeelServer] = []

    def start(**overrides: Any) -> KeelServer:
        server = KeelServer(make_settings(**overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run_db(database_url: str, action: Callable[[TenantService], Awaitable[T]]) -> T:
    async def go() -> T:
        engine = create_engine(database_url, pool_size=1)
        try:
            return await action(TenantService(engine))
        finally:
            await engine.dispose()

    return asyncio.run(go())


@pytest.fixture
def on_tenants(database_url: str) -> Callable[[Callable[[TenantService], Awaitable[Any]]], Any]:
    """`run_db` on the session's database, for tests (which cannot import this module)."""
    return lambda action: run_db(database_url, action)


@dataclass(frozen=True)
class TenantKeys:
    name: str
    tenant_id: uuid.UUID
    chat_key: str
    admin_key: str


@pytest.fixture
def make_tenant(database_url: str, keel: KeelServer) -> Callable[..., TenantKeys]:
    """A fresh tenant (the session server has migrated the database) with a chat and an admin key."""

    def make(tier: str = "enterprise") -> TenantKeys:
        async def go(tenants: TenantService) -> TenantKeys:
            tenant = await tenants.create_tenant(f"t-{uuid.uuid4().hex[:10]}", tier)
            _, chat = await tenants.create_key(tenant.name, "chat", "test chat")
            _, admin = await tenants.create_key(tenant.name, "admin", "test admin")
            return TenantKeys(tenant.name, tenant.id, chat, admin)

        return run_db(database_url, go)

    return make


@pytest.fixture
def tenant(make_tenant: Callable[..., TenantKeys]) -> TenantKeys:
    return make_tenant()


def _client(server: KeelServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def make_client() -> Iterator[Callable[[KeelServer, str], openai.OpenAI]]:
    """The official SDK, no retries (so each test sees the first answer); closed after the test, so no
    pooled socket is left for the garbage collector to warn about."""
    made: list[openai.OpenAI] = []

    def make(server: KeelServer, key: str) -> openai.OpenAI:
        made.append(_client(server, key))
        return made[-1]

    yield make
    for sdk in made:
        sdk.close()


@pytest.fixture
def client(
    keel: KeelServer, tenant: TenantKeys, make_client: Callable[[KeelServer, str], openai.OpenAI]
) -> openai.OpenAI:
    return make_client(keel, tenant.chat_key)


REDIS_URL = os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis; a test that needs it fails loudly (never skips) when it is not there."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"This test needs Redis at {REDIS_URL} ({exc}); start redis-server or set KEEL_TEST_REDIS_URL."
        )
    return REDIS_URL
