"""The pipeline's "resolve prompt" stage: reference → version (label, experiment) → rendered messages.

A request without a prompt returns at the first line. With one, labels, experiments and versions come
from the process cache (see cache.py), so a warm request touches no database.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from keel.errors import NotFoundError
from keel.pipeline import NO_PROMPT, ChatCall, FileSearch, ResolvedPrompt
from keel.prompts.cache import PromptCache
from keel.prompts.experiments import Experiment
from keel.prompts.spec import PRODUCTION
from keel.prompts.store import PromptStore
from keel.prompts.templates import CompiledVersion


class CanaryObserver(Protocol):
    def served(self, experiment_id: uuid.UUID) -> None:
        """A canary's variant answered a request: its numbers are worth a look soon."""


class RegistryResolver:
    def __init__(
        self,
        store: PromptStore,
        cache: PromptCache,
        *,
        max_rendered_chars: int,
        canaries: CanaryObserver | None = None,
    ) -> None:
        self._store = store
        self._cache = cache
        self._max_chars = max_rendered_chars
        self._canaries = canaries

    async def resolve(self, call: ChatCall) -> ResolvedPrompt:
        reference = call.prompt
        if reference is None:
            return NO_PROMPT
        name: str = reference["name"]
        version: int | None = reference.get("version")
        label: str | None = None
        experiment: Experiment | None = None
        if version is None:
            label = reference.get("label") or PRODUCTION
            version, experiment = await self._pick(call, name, label)
        compiled = await self._cache.version(
            call.tenant_id,
            name,
            version,
            lambda: self._compile(call.tenant_id, name, version),
        )
        variables: dict[str, Any] = reference.get("variables") or {}
        messages = await compiled.render_off_loop(variables, self._max_chars)
        return ResolvedPrompt(
            messages=messages,
            model=compiled.alias,
            defaults=compiled.defaults,
            retrieval=FileSearch.parse(compiled.retrieval),
            info={
                "name": name,
                "version": version,
                "label": label,
                "experiment": str(experiment.id) if experiment is not None else None,
                "variant": experiment.variant(version) if experiment is not None else None,
                "variables": sorted(variables),  # names only: values may be personal data
            },
        )

    async def _pick(self, call: ChatCall, name: str, label: str) -> tuple[int, Experiment | None]:
        tenant_id = call.tenant_id
        state = await self._cache.label(
            tenant_id, name, label, lambda: self._store.label_state(tenant_id, name, label)
        )
        if not state.prompt_exists:
            raise NotFoundError(f"No prompt {name!r}.", param="prompt.name", code="prompt_not_found")
        if state.version is None:
            raise NotFoundError(
                f"Prompt {name!r} has no label {label!r}.", param="prompt.label", code="label_not_found"
            )
        live = state.experiment
        if live is None:
            return state.version, None
        version = live.assign(_unit(call, live))
        if live.kind == "canary" and self._canaries is not None:
            self._canaries.served(live.id)
        return version, live

    async def _compile(self, tenant_id: uuid.UUID, name: str, version: int) -> CompiledVersion:
        try:
            stored = await self._store.version(tenant_id, name, version)
        except NotFoundError as exc:
            raise NotFoundError(exc.message, param="prompt.version", code=exc.code) from None
        return await CompiledVersion.build_off_loop(
            name, version, stored.template, stored.variables, stored.config
        )


def _unit(call: ChatCall, experiment: Experiment) -> str:
    """The unit a request belongs to; without one (no `user`, no conversation) the request is its own."""
    if experiment.unit == "tenant":
        return str(call.tenant_id)
    if experiment.unit == "user" and call.request.user:
        return f"user:{call.request.user}"
    if experiment.unit == "conversation" and call.conversation_id:
        return f"conversation:{call.conversation_id}"
    return f"request:{call.request_id}"
