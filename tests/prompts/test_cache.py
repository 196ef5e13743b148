"""The process's prompt cache is bounded and evicts least recently used entries, never everything at once:
names made up by one tenant's clients do not empty the cache of another; a burst of misses compiles once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from keel.prompts import cache as cache_module
from keel.prompts.cache import PromptCache
from keel.prompts.store import LabelState
from keel.prompts.templates import CompiledVersion

FOUND = LabelState(prompt_exists=True, version=1)
MISSING = LabelState(prompt_exists=False, version=None)


class Loads:
    """A loader that counts its calls: a cache hit is a call not made."""

    def __init__(self, state: LabelState) -> None:
        self.state = state
        self.calls = 0

    async def __call__(self) -> LabelState:
        self.calls += 1
        await asyncio.sleep(0)
        return self.state


def _version(name: str, size: int = 10) -> CompiledVersion:
    return CompiledVersion.build(name, 1, "x" * size, {}, {})


def test_made_up_names_evict_only_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "MAX_PROMPTS", 50)

    async def go() -> None:
        cache = PromptCache()
        cache.reset(enabled=True)
        victim, attacker = uuid.uuid4(), uuid.uuid4()
        loads = Loads(FOUND)
        await cache.label(victim, "support", "production", loads)
        for n in range(500):  # a client's random prompt names: negative answers, each cached
            await cache.label(attacker, f"random-{n}", "production", Loads(MISSING))
            if n % 10 == 0:  # the victim's prompt stays in use meanwhile
                await cache.label(victim, "support", "production", loads)
        assert loads.calls == 1  # never evicted: in use, so never the least recently used

    asyncio.run(go())


def test_a_change_still_wins_over_a_load_that_raced_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forgetting old generations (bounded, oldest first) must not let a stale read be stored."""
    monkeypatch.setattr(cache_module, "MAX_GENERATIONS", 5)

    async def go() -> None:
        cache = PromptCache()
        cache.reset(enabled=True)
        tenant = uuid.uuid4()
        started = asyncio.Event()
        release = asyncio.Event()

        async def slow_stale() -> LabelState:
            started.set()
            await release.wait()
            return LabelState(prompt_exists=True, version=1)

        loading = asyncio.create_task(cache.label(tenant, "bot", "production", slow_stale))
        await started.wait()
        cache.invalidate(tenant, "bot")  # the label moved while the read was in flight
        for n in range(20):  # other prompts change: "bot"'s generation is forgotten
            cache.invalidate(tenant, f"other-{n}")
        release.set()
        assert (await loading).version == 1  # the caller gets what it read...
        fresh = Loads(LabelState(prompt_exists=True, version=2))
        assert (await cache.label(tenant, "bot", "production", fresh)).version == 2  # ...the cache kept none
        assert fresh.calls == 1

    asyncio.run(go())


def test_compiled_versions_are_bounded_by_count_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "MAX_VERSIONS", 3)
    monkeypatch.setattr(cache_module, "MAX_VERSION_CHARS", 1_000)

    async def go() -> None:
        cache = PromptCache()
        tenant = uuid.uuid4()
        compiles: list[str] = []

        def loader(name: str, size: int = 10) -> Callable[[], Awaitable[CompiledVersion]]:
            async def load() -> CompiledVersion:
                compiles.append(name)
                await asyncio.sleep(0)
                return _version(name, size)

            return load

        burst = [cache.version(tenant, "a", 1, loader("a")) for _ in range(20)]
        assert len({id(v) for v in await asyncio.gather(*burst)}) == 1
        assert compiles == ["a"]  # one compile for the burst
        for name in ("b", "c", "a", "d"):  # "a" is used again, so "b" is the one to go
            await cache.version(tenant, name, 1, loader(name))
        await cache.version(tenant, "a", 1, loader("a"))
        await cache.version(tenant, "b", 1, loader("b"))
        assert compiles == ["a", "b", "c", "d", "b"]
        await cache.version(tenant, "big", 1, loader("big", 995))
        await cache.version(tenant, "a", 1, loader("a"))
        assert compiles[-2:] == ["big", "a"]  # 995 characters pushed the others out

    asyncio.run(go())
