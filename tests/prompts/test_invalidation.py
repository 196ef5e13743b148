"""Two Keel processes on one database: a warm one serves from its cache (no query per request), hears a label
move made through the other within a second, never serves a removed label after that, and keeps doing so
after its listening connection was killed (as a database restart does)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from keel.prompts.invalidation import APPLICATION_NAME, asyncpg_dsn
from keel.testing import FakeUpstream, KeelProcess
from keel.testing.server import KeelServer

WITHIN = 1.0  # seconds


def _sql(database_url: str, query: str, *args: Any) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def _served(client: openai.OpenAI, fake: FakeUpstream, name: str, label: str = "production") -> str | None:
    """The rendered system message the upstream got, or None when the label does not exist (404)."""
    try:
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"prompt": {"name": name, "label": label, "variables": {"company": "Acme"}}},
        )
    except openai.NotFoundError:
        return None
    content: str = fake.requests[-1].body["messages"][0]["content"]
    return content


def _until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"not within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - began


def _listeners(database_url: str) -> int:
    count: int = _sql(
        database_url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        APPLICATION_NAME,
    )
    return count


def _sneak(database_url: str, tenant_id: Any, name: str, version: int) -> None:
    """Point production at `version` behind Keel's back: no NOTIFY, so only a process that reads the
    database per request could see it."""
    _sql(
        database_url,
        "UPDATE prompt_labels SET version = $3 FROM prompts WHERE prompts.id = prompt_labels.prompt_id"
        " AND prompts.tenant_id = $1 AND prompts.name = $2 AND label = 'production'",
        tenant_id,
        name,
        version,
    )


def _check_propagation(
    database_url: str,
    writer: Any,
    reader: openai.OpenAI,
    fake: FakeUpstream,
    tenant_id: Any,
    name: str,
) -> float:
    """Warm the reader, prove it is caching, move the label through the writer; the seconds it took."""
    writer.move(name, "production", 1)
    assert _served(reader, fake, name) == "One for Acme."
    _sneak(database_url, tenant_id, name, 2)
    for _ in range(3):
        assert _served(reader, fake, name) == "One for Acme."  # cached: the database was not asked
    _sneak(database_url, tenant_id, name, 1)

    writer.move(name, "production", 2)
    return _until(lambda: _served(reader, fake, name) == "Two for Acme.", WITHIN)


def test_a_label_move_reaches_the_other_process_within_a_second_and_a_removal_sticks(
    keel: KeelServer,
    start_keel: Callable[..., KeelServer],
    tenant: Any,
    make_admin: Any,
    make_client: Any,
    spec: Any,
    prompt_name: str,
    fake: FakeUpstream,
    database_url: str,
) -> None:
    other = start_keel()
    writer = make_admin(keel, tenant.admin_key)
    reader = make_client(other, tenant.chat_key)
    writer.push(spec(prompt_name, template="One for {{ company }}.", labels=["production", "beta"]))
    writer.push(spec(prompt_name, template="Two for {{ company }}."))

    took = _check_propagation(database_url, writer, reader, fake, tenant.tenant_id, prompt_name)
    assert took < WITHIN

    assert _served(reader, fake, prompt_name, "beta") == "One for Acme."
    writer.call("DELETE", f"/prompts/{prompt_name}/labels/beta")
    _until(lambda: _served(reader, fake, prompt_name, "beta") is None, WITHIN)
    for _ in range(20):  # never again
        assert _served(reader, fake, prompt_name, "beta") is None


def test_the_listener_reconnects_after_its_connection_is_killed(
    keel: KeelServer,
    start_keel: Callable[..., KeelServer],
    tenant: Any,
    make_admin: Any,
    make_client: Any,
    spec: Any,
    prompt_name: str,
    fake: FakeUpstream,
    database_url: str,
) -> None:
    other = start_keel()
    writer = make_admin(keel, tenant.admin_key)
    reader = make_client(other, tenant.chat_key)
    writer.push(spec(prompt_name, template="One for {{ company }}.", labels=["production"]))
    writer.push(spec(prompt_name, template="Two for {{ company }}."))
    listening = _listeners(database_url)
    assert listening >= 2  # the session server's and the new one's
    assert _served(reader, fake, prompt_name) == "One for Acme."  # cached now

    killed = _sql(
        database_url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = $1 AND datname = current_database()",
        APPLICATION_NAME,
    )
    assert killed == listening
    # A change nobody was told of, made while the listener was away: it must not be hidden by the cache.
    _sneak(database_url, tenant.tenant_id, prompt_name, 2)
    _until(lambda: _served(reader, fake, prompt_name) == "Two for Acme.", WITHIN)
    _until(lambda: _listeners(database_url) == listening, 10)

    took = _check_propagation(database_url, writer, reader, fake, tenant.tenant_id, prompt_name)
    assert took < WITHIN


@pytest.mark.redis
def test_with_redis_changes_travel_by_pub_sub(
    start_keel: Callable[..., KeelServer],
    tenant: Any,
    make_admin: Any,
    make_client: Any,
    spec: Any,
    prompt_name: str,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
) -> None:
    first, second = start_keel(redis_url=redis_url), start_keel(redis_url=redis_url)
    writer = make_admin(first, tenant.admin_key)
    reader = make_client(second, tenant.chat_key)
    writer.push(spec(prompt_name, template="One for {{ company }}.", labels=["production"]))
    writer.push(spec(prompt_name, template="Two for {{ company }}."))

    took = _check_propagation(database_url, writer, reader, fake, tenant.tenant_id, prompt_name)
    assert took < WITHIN


def test_a_label_move_reaches_a_separate_keel_os_process_within_a_second(
    keel: KeelServer,
    tenant: Any,
    make_admin: Any,
    spec: Any,
    prompt_name: str,
    fake: FakeUpstream,
    database_url: str,
    tmp_path: Path,
) -> None:
    """The same as above with the reader a real `keel serve` process of its own."""
    config = tmp_path / "keel.toml"
    config.write_text(
        f'default_model = "fake"\n[models.fake]\nprovider = "openai"\nbase_url = "{fake.openai_base_url}"\n'
    )
    env = {"KEEL_DATABASE_URL": database_url, "KEEL_CONFIG": str(config), "KEEL_LOG_LEVEL": "WARNING"}
    with KeelProcess(tmp_path, env) as server:
        writer = make_admin(keel, tenant.admin_key)
        writer.push(spec(prompt_name, template="One for {{ company }}.", labels=["production"]))
        writer.push(spec(prompt_name, template="Two for {{ company }}."))
        with openai.OpenAI(base_url=server.base_url, api_key=tenant.chat_key, max_retries=0) as reader:
            took = _check_propagation(database_url, writer, reader, fake, tenant.tenant_id, prompt_name)
        assert took < WITHIN
