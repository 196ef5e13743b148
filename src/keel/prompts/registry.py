"""The prompt registry's operations, one per CLI command and admin route: push, show, history, diff,
promote, rollback, experiments and canaries. No HTTP here; the caller passes the tenant and the author."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from keel.errors import InvalidRequestError, NotFoundError
from keel.prompts.changes import ChangePublisher
from keel.prompts.diff import unified
from keel.prompts.experiment_store import ExperimentInfo, ExperimentStore
from keel.prompts.experiments import variant_name
from keel.prompts.gate import AllowAll, Promotion, PromotionGate
from keel.prompts.spec import LATEST, PRODUCTION, PromptSpec, check_label
from keel.prompts.stats import compare, variant_stats
from keel.prompts.store import LabelMove, PromptStore
from keel.prompts.templates import TemplateProblem, check_templates


class PromptRegistry:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        gate: PromotionGate | None = None,
        publisher: ChangePublisher | None = None,
    ) -> None:
        self.engine = engine
        self.store = PromptStore(engine, publisher)
        self.experiments = ExperimentStore(engine, publisher)
        self.gate: PromotionGate = gate or AllowAll()

    # -- versions

    async def push(self, tenant_id: uuid.UUID, spec: PromptSpec, author: str) -> dict[str, Any]:
        """Store the spec (identical content: the existing version), then point its labels at it."""
        parts = [("template", spec.template)] if spec.template is not None else []
        parts += [(f"messages.{n}.content", message.content) for n, message in enumerate(spec.messages or [])]
        try:
            await check_templates(parts, spec.variables_json())
        except TemplateProblem as exc:
            raise InvalidRequestError(str(exc), param=exc.where, code="invalid_template") from None
        for label in spec.labels:
            _movable(label)
        stored, created = await self.store.push(tenant_id, spec, author)
        moved = []
        for label in spec.labels:
            moved.append(await self.promote(tenant_id, spec.name, stored.version, label, author, "push"))
        return {
            "object": "prompt.push",
            "name": spec.name,
            "version": stored.version,
            "created": created,
            "content_hash": stored.content_hash,
            "labels": moved,
        }

    async def list(self, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
        return await self.store.list(tenant_id)

    async def show(
        self, tenant_id: uuid.UUID, name: str, *, label: str | None = None, version: int | None = None
    ) -> dict[str, Any]:
        """A version by number, or the one a label points at (`latest` by default)."""
        if version is None:
            state = await self.store.label_state(tenant_id, name, label or LATEST)
            if not state.prompt_exists:
                raise NotFoundError(f"No prompt {name!r}.", param="name", code="prompt_not_found")
            if state.version is None:
                raise NotFoundError(
                    f"Prompt {name!r} has no label {label!r}.", param="label", code="label_not_found"
                )
            version = state.version
        stored = await self.store.version(tenant_id, name, version)
        labels = await self.store.labels(tenant_id, name)
        newest = (await self.store.label_state(tenant_id, name, LATEST)).version
        pointing = sorted(each for each, at in labels.items() if at == version)
        if version == newest:
            pointing.append(LATEST)
        return stored.json() | {"labels": pointing}

    async def history(self, tenant_id: uuid.UUID, name: str) -> dict[str, Any]:
        versions = await self.store.versions(tenant_id, name)
        return {
            "object": "prompt.history",
            "name": name,
            "labels": await self.store.labels(tenant_id, name) | {LATEST: versions[-1].version},
            "versions": [
                {
                    "version": v.version,
                    "author": v.author,
                    "description": v.description,
                    "tags": v.tags,
                    "content_hash": v.content_hash,
                    "created_at": v.created_at.isoformat(),
                }
                for v in versions
            ],
            "moves": [move.json() for move in await self.store.moves(tenant_id, name)],
        }

    async def diff(self, tenant_id: uuid.UUID, name: str, old: int, new: int) -> str:
        return unified(
            await self.store.version(tenant_id, name, old), await self.store.version(tenant_id, name, new)
        )

    # -- labels

    async def promote(
        self,
        tenant_id: uuid.UUID,
        name: str,
        version: int,
        label: str,
        author: str,
        reason: str = "",
        *,
        force: bool = False,
        ends_experiment_as: str = "ended",
    ) -> dict[str, Any]:
        """Point `label` at `version`. Moves of `production` pass the gate; `force` overrides a refusal."""
        _movable(label)
        if force and not reason:
            raise InvalidRequestError("A forced promotion needs a reason.", param="reason")
        forced = False
        if label == PRODUCTION:
            verdict = await self.gate.check(Promotion(tenant_id, name, version, label, author))
            if not verdict.allowed:
                if not force:
                    raise InvalidRequestError(
                        f"The promotion gate refused {name}@{version} for {label}: {verdict.reason}",
                        param="version",
                        code="promotion_refused",
                    )
                forced = True
                reason = f"{reason} (forced past the gate: {verdict.reason})"
        move = await self.store.move_label(
            tenant_id,
            name,
            label,
            version,
            author=author,
            reason=reason,
            forced=forced,
            ends_experiment_as=ends_experiment_as,
        )
        return _move_json(name, label, version, move)

    async def rollback(
        self, tenant_id: uuid.UUID, name: str, label: str, author: str, reason: str = ""
    ) -> dict[str, Any]:
        """Move `label` back to where it pointed before its last move. Emergency path: no gate."""
        _movable(label)
        last = await self.store.last_move(tenant_id, name, label)
        if last is None:
            raise NotFoundError(
                f"Prompt {name!r} has no label {label!r}.", param="label", code="label_not_found"
            )
        if last.from_version is None:
            raise InvalidRequestError(
                f"Label {label!r} was created by its last move: there is nothing to roll back to.",
                param="label",
                code="nothing_to_roll_back",
            )
        reason = reason or f"rollback of {last.from_version} -> {last.to_version}"
        move = await self.store.move_label(
            tenant_id, name, label, last.from_version, author=author, reason=reason
        )
        return _move_json(name, label, last.from_version, move)

    async def unlabel(
        self, tenant_id: uuid.UUID, name: str, label: str, author: str, reason: str = ""
    ) -> dict[str, Any]:
        _movable(label)
        move = await self.store.move_label(tenant_id, name, label, None, author=author, reason=reason)
        return _move_json(name, label, None, move)

    # -- experiments and canaries

    async def start_experiment(
        self,
        tenant_id: uuid.UUID,
        name: str,
        label: str,
        weights: dict[int, int],
        *,
        unit: str,
        author: str,
    ) -> dict[str, Any]:
        _movable(label)
        info = await self.experiments.start(tenant_id, name, label, weights, unit=unit, author=author)
        return info.json()

    async def set_weights(
        self, tenant_id: uuid.UUID, name: str, label: str, weights: dict[int, int], *, author: str
    ) -> dict[str, Any]:
        return (await self.experiments.set_weights(tenant_id, name, label, weights, author=author)).json()

    async def stop_experiment(
        self, tenant_id: uuid.UUID, name: str, label: str, *, author: str, reason: str = ""
    ) -> dict[str, Any]:
        info = await self.experiments.finish(tenant_id, name, label, "ended", author=author, reason=reason)
        return info.json()

    async def start_canary(
        self,
        tenant_id: uuid.UUID,
        name: str,
        version: int,
        percent: int,
        *,
        label: str = PRODUCTION,
        unit: str = "user",
        author: str,
    ) -> dict[str, Any]:
        _movable(label)
        if not 1 <= percent <= 99:
            raise InvalidRequestError("A canary's percent is between 1 and 99.", param="percent")
        info = await self.experiments.start(
            tenant_id,
            name,
            label,
            {version: percent},
            unit=unit,
            author=author,
            kind="canary",
            candidate=version,
        )
        return info.json()

    async def promote_canary(
        self,
        tenant_id: uuid.UUID,
        name: str,
        label: str,
        author: str,
        reason: str = "",
        *,
        force: bool = False,
    ) -> dict[str, Any]:
        """The canary's version takes the whole label (through the gate); the canary ends as promoted."""
        info = await self._live_canary(tenant_id, name, label)
        assert info.candidate is not None
        return await self.promote(
            tenant_id,
            name,
            info.candidate,
            label,
            author,
            reason or "canary promoted",
            force=force,
            ends_experiment_as="promoted",
        )

    async def abort_canary(
        self, tenant_id: uuid.UUID, name: str, label: str, author: str, reason: str = ""
    ) -> dict[str, Any]:
        await self._live_canary(tenant_id, name, label)
        info = await self.experiments.finish(tenant_id, name, label, "aborted", author=author, reason=reason)
        return info.json()

    async def status(self, tenant_id: uuid.UUID, name: str, label: str) -> dict[str, Any]:
        """Per variant: requests, error rate, p50/p99 latency, output tokens, feedback, significance."""
        info = await self.experiments.live(tenant_id, name, label)
        if info is None:
            raise NotFoundError(
                f"Label {label!r} of prompt {name!r} never had an experiment.",
                param="label",
                code="experiment_not_found",
            )
        variants = {v: variant_name(info.kind, v, info.candidate) for v in info.weights}
        stats = await variant_stats(self.engine, tenant_id, info.id, variants)
        baseline = stats[info.baseline]
        for version, numbers in stats.items():
            if version != info.baseline:
                numbers.tests = compare(baseline, numbers)
        return {
            "object": "prompt.experiment.status",
            "experiment": info.json(),
            "variants": [stats[v].json() for v in sorted(stats)],
            "events": await self.experiments.events(info.id),
        }

    async def _live_canary(self, tenant_id: uuid.UUID, name: str, label: str) -> ExperimentInfo:
        info = await self.experiments.live(tenant_id, name, label)
        if info is None or info.kind != "canary" or info.status not in ("running", "paused"):
            raise NotFoundError(
                f"Label {label!r} of prompt {name!r} has no live canary.",
                param="label",
                code="experiment_not_found",
            )
        return info


def _movable(label: str) -> None:
    if label == LATEST:
        raise InvalidRequestError("'latest' always points at the newest version; it cannot be moved.")
    try:
        check_label(label)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="label") from None


def _move_json(name: str, label: str, version: int | None, move: LabelMove | None) -> dict[str, Any]:
    if move is None:
        return {"object": "prompt.label", "name": name, "label": label, "version": version, "changed": False}
    return {"object": "prompt.label", "name": name, "version": version, "changed": True} | move.json()
