"""What one Keel process remembers about prompts, so a request costs no database query.

Labels (with their live experiment) are cached per prompt and dropped when the prompt changes; versions
never change, so they stay. The cache only keeps anything while an invalidation listener is connected:
without one it could not hear of changes, so every lookup goes to the database instead.

A lookup that raced with a change must not store what it read before the change: each prompt has a
generation, bumped by every invalidation, and a loader stores its result only if the generation it started
under is still current.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from keel.prompts.store import LabelState
from keel.prompts.templates import CompiledVersion

T = TypeVar("T")
PromptKey = tuple[uuid.UUID, str]

MAX_PROMPTS = 10_000  # cached prompts (negative answers included); beyond it the cache starts over
MAX_VERSIONS = 10_000


class PromptCache:
    def __init__(self) -> None:
        self.enabled = False  # True only while a listener hears every change
        self._labels: dict[PromptKey, dict[str, LabelState]] = {}
        self._versions: dict[tuple[uuid.UUID, str, int], CompiledVersion] = {}
        self._generations: dict[PromptKey, int] = {}
        self._epoch = 0  # bumped when everything is dropped (listener lost or regained)
        self._loading: dict[tuple[PromptKey, str], asyncio.Task[LabelState]] = {}

    def invalidate(self, tenant_id: uuid.UUID, name: str) -> None:
        key = (tenant_id, name)
        self._labels.pop(key, None)
        self._generations[key] = self._generations.get(key, 0) + 1
        if len(self._generations) > MAX_PROMPTS:
            self.reset(enabled=self.enabled)

    async def changed(self, tenant_id: uuid.UUID, name: str) -> None:
        """As a ChangePublisher: this process's own writes are visible to its next request at once,
        without waiting for its own notification to come back."""
        self.invalidate(tenant_id, name)

    def reset(self, *, enabled: bool) -> None:
        """Forget every label; on (re)connecting a listener, changes may have been missed."""
        self._labels.clear()
        self._generations.clear()
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
        found = self._labels.get(key, {}).get(label)
        if found is not None:
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
        stamp = (self._epoch, self._generations.get(key, 0))
        try:
            state = await load()
        finally:
            del self._loading[(key, label)]
        if self.enabled and stamp == (self._epoch, self._generations.get(key, 0)):
            if len(self._labels) >= MAX_PROMPTS:
                self._labels.clear()
            self._labels.setdefault(key, {})[label] = state
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
            return found
        compiled = await load()
        if len(self._versions) >= MAX_VERSIONS:
            self._versions.clear()
        self._versions[key] = compiled
        return compiled


def _retrieve(task: asyncio.Task[LabelState]) -> None:
    """Every waiter may have left; the error was theirs to see, not the event loop's to log."""
    if not task.cancelled():
        task.exception()
