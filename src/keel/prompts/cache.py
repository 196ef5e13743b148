"""What one Keel process remembers about prompts, so a request costs no database query.

Labels (with their live experiment) are cached per prompt and dropped when the prompt changes; versions
never change, so they stay. The cache only keeps anything while an invalidation listener is connected:
without one it could not hear of changes, so every lookup goes to the database instead.

A lookup that raced with a change must not store what it read before the change: each prompt has a
generation, set from a process-wide counter by every invalidation, and a loader stores its result only if
the generation it started under is still current.

Every map is bounded and evicts its least recently used entries, never everything at once: names that
clients make up fill the negative label cache of no other tenant. Compiled versions are bounded by count
and by the template text they hold; a generation that is evicted raises the floor that prompts without
one read, so a loader that started before the eviction never stores.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from keel.prompts.store import LabelState
from keel.prompts.templates import CompiledVersion

T = TypeVar("T")
PromptKey = tuple[uuid.UUID, str]
VersionKey = tuple[uuid.UUID, str, int]

MAX_PROMPTS = 10_000  # prompts with cached labels (negative answers included), least recently used out
MAX_GENERATIONS = 100_000  # prompts whose last change is remembered, oldest out
MAX_VERSIONS = 2_000  # compiled versions, least recently used out
MAX_VERSION_CHARS = 20_000_000  # template text of the compiled versions together


class PromptCache:
    def __init__(self) -> None:
        self.enabled = False  # True only while a listener hears every change
        self._labels: OrderedDict[PromptKey, dict[str, LabelState]] = OrderedDict()
        self._versions: OrderedDict[VersionKey, CompiledVersion] = OrderedDict()
        self._version_chars = 0
        self._generations: OrderedDict[PromptKey, int] = OrderedDict()
        self._clock = 0  # the last generation given out
        self._floor = 0  # the generation of a prompt that has none (never changed, or evicted)
        self._epoch = 0  # bumped when everything is dropped (listener lost or regained)
        self._loading: dict[tuple[PromptKey, str], asyncio.Task[LabelState]] = {}
        self._compiling: dict[VersionKey, asyncio.Task[CompiledVersion]] = {}

    def invalidate(self, tenant_id: uuid.UUID, name: str) -> None:
        key = (tenant_id, name)
        self._labels.pop(key, None)
        self._clock += 1
        self._generations[key] = self._clock
        self._generations.move_to_end(key)
        if len(self._generations) > MAX_GENERATIONS:
            _, evicted = self._generations.popitem(last=False)
            self._floor = max(self._floor, evicted)

    def _generation(self, key: PromptKey) -> int:
        return self._generations.get(key, self._floor)

    async def changed(self, tenant_id: uuid.UUID, name: str) -> None:
        """As a ChangePublisher: this process's own writes are visible to its next request at once,
        without waiting for its own notification to come back."""
        self.invalidate(tenant_id, name)

    def reset(self, *, enabled: bool) -> None:
        """Forget every label; on (re)connecting a listener, changes may have been missed."""
        self._labels.clear()
        self._generations.clear()
        self._floor = self._clock
        self._epoch += 1
        self.enabled = enabled

    async def label(
        self,
        tenant_id: uuid.UUID,
        name: str,
        label: str,
        load: Callable[[], Awaitable[LabelState]],
    ) -> LabelState:
        key = (tenant_id, name)
        states = self._labels.get(key)
        found = states.get(label) if states is not None else None
        if found is not None:
            self._labels.move_to_end(key)
            return found
        if not self.enabled:
            return await load()
        loading = self._loading.get((key, label))
        if loading is None:  # one query for a burst of misses, not cancelled with the first caller
            loading = asyncio.create_task(self._load(key, label, load))
            loading.add_done_callback(_retrieve)
            self._loading[(key, label)] = loading
        return await asyncio.shield(loading)

    async def _load(
        self, key: PromptKey, label: str, load: Callable[[], Awaitable[LabelState]]
    ) -> LabelState:
        stamp = (self._epoch, self._generation(key))
        try:
            state = await load()
        finally:
            del self._loading[(key, label)]
        if self.enabled and stamp == (self._epoch, self._generation(key)):
            self._labels.setdefault(key, {})[label] = state
            self._labels.move_to_end(key)
            if len(self._labels) > MAX_PROMPTS:
                self._labels.popitem(last=False)
        return state

    async def version(
        self,
        tenant_id: uuid.UUID,
        name: str,
        number: int,
        load: Callable[[], Awaitable[CompiledVersion]],
    ) -> CompiledVersion:
        key = (tenant_id, name, number)
        found = self._versions.get(key)
        if found is not None:
            self._versions.move_to_end(key)
            return found
        compiling = self._compiling.get(key)
        if compiling is None:  # one compile for a burst of misses, not cancelled with the first caller
            compiling = asyncio.create_task(self._compile(key, load))
            compiling.add_done_callback(_retrieve)
            self._compiling[key] = compiling
        return await asyncio.shield(compiling)

    async def _compile(
        self, key: VersionKey, load: Callable[[], Awaitable[CompiledVersion]]
    ) -> CompiledVersion:
        try:
            compiled = await load()
        finally:
            del self._compiling[key]
        if key not in self._versions:
            self._versions[key] = compiled
            self._version_chars += compiled.size
        while len(self._versions) > MAX_VERSIONS or (
            self._version_chars > MAX_VERSION_CHARS and len(self._versions) > 1
        ):
            _, evicted = self._versions.popitem(last=False)
            self._version_chars -= evicted.size
        return compiled


def _retrieve(task: asyncio.Task[T]) -> None:
    """Every waiter may have left; the error was theirs to see, not the event loop's to log."""
    if not task.cancelled():
        task.exception()
