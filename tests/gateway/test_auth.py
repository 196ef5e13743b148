"""Authentication under abuse: malformed keys cost no query, the cache evicts the least recently used,
failed attempts are throttled per client address."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from keel.db.engine import create_engine
from keel.errors import AuthenticationError, RateLimitError
from keel.gateway.auth import Authenticator
from keel.gateway.auth_throttle import AuthThrottle
from keel.tenants import TenantService
from keel.tenants.keys import KEY_PREFIX
from keel.testing.server import KeelServer


def _random_key() -> str:
    """Well formed (right prefix, length and alphabet), but no such key exists."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_keys_of_the_wrong_shape_are_refused_without_a_database_query() -> None:
    async def go() -> None:
        # Nothing listens on this port: any key that reaches the database fails to connect instead.
        engine = create_engine(f"postgresql://keel@127.0.0.1:{_closed_port()}/keel", pool_size=1)
        auth = Authenticator(TenantService(engine), ttl=60, flush_every=60, failures_per_minute=0)
        try:
            for wrong in (
                "sk-keel-short",
                "sk-live-" + secrets.token_urlsafe(32),  # another prefix
                KEY_PREFIX + secrets.token_urlsafe(32) + "x",  # too long
                KEY_PREFIX + "!" * 43,  # not the key alphabet
                "x" * 10_000,
            ):
                with pytest.raises(AuthenticationError) as caught:
                    await auth.authenticate(f"Bearer {wrong}")
                assert caught.value.code == "invalid_api_key"
            with pytest.raises(
                ConnectionRefusedError
            ):  # the control: a well-formed key does go to the database
                await auth.authenticate(f"Bearer {_random_key()}")
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_a_flood_of_unknown_keys_evicts_the_least_recently_used_not_the_keys_in_use(
    database_url: str, tenant: Any
) -> None:
    """A revoked key keeps working while its answer is cached (TTL): that shows what the cache kept."""

    async def go() -> None:
        engine = create_engine(database_url, pool_size=2)
        tenants = TenantService(engine)
        auth = Authenticator(tenants, ttl=300, flush_every=300, cache_size=20, failures_per_minute=0)
        try:
            busy_info, busy = await tenants.create_key(tenant.name, "chat", "busy")
            idle_info, idle = await tenants.create_key(tenant.name, "chat", "idle")
            await auth.authenticate(f"Bearer {busy}")
            await auth.authenticate(f"Bearer {idle}")
            await tenants.revoke(str(busy_info.id))
            await tenants.revoke(str(idle_info.id))
            for n in range(100):  # five times the cache's size
                with pytest.raises(AuthenticationError):
                    await auth.authenticate(f"Bearer {_random_key()}")
                if n % 5 == 0:
                    await auth.authenticate(f"Bearer {busy}")  # in use: stays cached
            assert (await auth.authenticate(f"Bearer {busy}")).key_id == busy_info.id
            with pytest.raises(AuthenticationError):  # evicted, so looked up again: revoked
                await auth.authenticate(f"Bearer {idle}")
        finally:
            await auth.aclose()
            await engine.dispose()

    asyncio.run(go())


def _models(client: httpx.Client, key: str) -> httpx.Response:
    return client.get("/models", headers={"Authorization": f"Bearer {key}"})


def test_failed_auth_is_throttled_per_client_address(
    start_keel: Callable[..., KeelServer], make_tenant: Callable[..., Any]
) -> None:
    server = start_keel(auth_failures_per_minute=30)  # a failure back every 2 s
    keys = make_tenant()
    with (
        httpx.Client(base_url=server.base_url, timeout=30) as client,
        httpx.Client(
            base_url=server.base_url,
            timeout=30,
            transport=httpx.HTTPTransport(local_address="127.0.0.2"),  # another client address
        ) as neighbour,
    ):
        assert _models(client, keys.chat_key).status_code == 200  # verified, now cached
        for n in range(30):
            wrong = _random_key() if n % 2 else "sk-keel-nope"
            assert _models(client, wrong).status_code == 401
        throttled = _models(client, _random_key())
        assert throttled.status_code == 429, throttled.text
        error = throttled.json()["error"]
        assert error["code"] == "too_many_failed_auth" and error["type"] == "rate_limit_error"
        assert 1 <= int(throttled.headers["retry-after"]) <= 2
        # The chat route answers the same way (it authenticates outside FastAPI).
        chat = client.post(
            "/chat/completions",
            headers={"Authorization": f"Bearer {_random_key()}"},
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 429 and "retry-after" in chat.headers

        assert _models(client, keys.chat_key).status_code == 200  # a key already verified still works
        assert _models(client, keys.admin_key).status_code == 429  # one not yet verified waits
        assert _models(neighbour, keys.admin_key).status_code == 200  # other addresses are not held
        assert _models(neighbour, _random_key()).status_code == 401

        time.sleep(int(throttled.headers["retry-after"]) + 0.2)
        assert _models(client, _random_key()).status_code == 401  # a failure is allowed again


def test_ipv6_clients_are_throttled_by_their_64_prefix() -> None:
    throttle = AuthThrottle(2)
    throttle.failed("2001:db8:1:2::1")
    throttle.failed("2001:db8:1:2::ffff")
    with pytest.raises(RateLimitError):
        throttle.check("2001:db8:1:2:abcd::1")  # the same /64
    throttle.check("2001:db8:1:3::1")  # the next /64
    throttle.check("192.0.2.1")
    throttle.failed("::ffff:192.0.2.9")  # IPv4-mapped counts as the IPv4 address
    throttle.failed("192.0.2.9")
    with pytest.raises(RateLimitError):
        throttle.check("192.0.2.9")
