"""Experiments and canaries in PostgreSQL: start, reweigh, pause, finish; every step is an event.

One live (running or paused) experiment per prompt label. A paused canary keeps its record and its slot
table with the canary's share at 0; only running experiments are applied to requests.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keel.db.tables import (
    prompt_experiment_events,
    prompt_experiments,
    prompt_labels,
    prompt_versions,
    prompts,
)
from keel.errors import InvalidRequestError, NotFoundError
from keel.prompts.changes import ChangePublisher, NoPublisher, lock_prompt, notify
from keel.prompts.experiments import UNITS, allocate, weights_of

log = logging.getLogger(__name__)

LIVE = ("running", "paused")


@dataclass(frozen=True, slots=True)
class ExperimentInfo:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    label: str
    kind: str
    unit: str
    status: str
    slots: list[int]
    baseline: int
    candidate: int | None
    author: str
    created_at: datetime
    updated_at: datetime

    @property
    def weights(self) -> dict[int, int]:
        known = [self.baseline] + ([self.candidate] if self.candidate is not None else [])
        return weights_of(self.slots, known)

    def json(self) -> dict[str, Any]:
        return {
            "object": "prompt.experiment",
            "id": str(self.id),
            "name": self.name,
            "label": self.label,
            "kind": self.kind,
            "unit": self.unit,
            "status": self.status,
            "weights": {str(version): weight for version, weight in self.weights.items()},
            "baseline": self.baseline,
            "candidate": self.candidate,
            "author": self.author,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


async def end_live_experiment(
    conn: AsyncConnection, prompt_id: uuid.UUID, label: str, author: str, status: str, reason: str
) -> uuid.UUID | None:
    """Finish the label's live experiment, if any, inside the caller's transaction."""
    ended = await conn.execute(
        prompt_experiments.update()
        .where(
            prompt_experiments.c.prompt_id == prompt_id,
            prompt_experiments.c.label == label,
            prompt_experiments.c.status.in_(LIVE),
        )
        .values(status=status, updated_at=func.now())
        .returning(prompt_experiments.c.id)
    )
    found: uuid.UUID | None = ended.scalar_one_or_none()
    if found is not None:
        await _event(conn, found, status, {"reason": reason}, author)
    return found


async def _event(
    conn: AsyncConnection, experiment_id: uuid.UUID, event: str, details: dict[str, Any], author: str
) -> None:
    await conn.execute(
        prompt_experiment_events.insert().values(
            experiment_id=experiment_id, event=event, details=details, author=author
        )
    )


class ExperimentStore:
    def __init__(self, engine: AsyncEngine, publisher: ChangePublisher | None = None) -> None:
        self.engine = engine
        self.publisher = publisher or NoPublisher()

    async def start(
        self,
        tenant_id: uuid.UUID,
        name: str,
        label: str,
        weights: dict[int, int],
        *,
        unit: str,
        author: str,
        kind: str = "experiment",
        candidate: int | None = None,
    ) -> ExperimentInfo:
        """Split `label` by `weights`. A canary's weights are {label's version: 100 - p, candidate: p}."""
        if unit not in UNITS:
            raise InvalidRequestError(f"unit must be one of {', '.join(UNITS)}.", param="unit")
        async with self.engine.begin() as conn:
            prompt_id = await lock_prompt(conn, tenant_id, name)
            baseline = await self._label_version(conn, prompt_id, name, label)
            if kind == "canary":
                if candidate is None or candidate == baseline:
                    raise InvalidRequestError(
                        f"The canary version must differ from {label}'s version {baseline}.",
                        param="version",
                    )
                weights = {baseline: 100 - weights.get(candidate, 0), candidate: weights.get(candidate, 0)}
            await self._versions_exist(conn, prompt_id, name, list(weights))
            if await self._live_id(conn, prompt_id, label) is not None:
                raise InvalidRequestError(
                    f"Label {label!r} of prompt {name!r} already has a live experiment; finish it first.",
                    param="label",
                    code="experiment_exists",
                )
            slots = _allocate(weights, None)
            created = await conn.execute(
                prompt_experiments.insert()
                .values(
                    prompt_id=prompt_id,
                    label=label,
                    kind=kind,
                    unit=unit,
                    status="running",
                    slots=slots,
                    baseline=baseline if baseline in weights else min(weights),
                    candidate=candidate,
                    author=author,
                )
                .returning(prompt_experiments.c.id)
            )
            experiment_id = created.scalar_one()
            await _event(conn, experiment_id, "started", {"weights": _weights_json(weights)}, author)
            await notify(conn, tenant_id, name)
        await self.publisher.changed(tenant_id, name)
        return await self.get(experiment_id)

    async def set_weights(
        self, tenant_id: uuid.UUID, name: str, label: str, weights: dict[int, int], *, author: str
    ) -> ExperimentInfo:
        """New weights for the live experiment (a paused one runs again); only the units that must move do."""
        async with self.engine.begin() as conn:
            prompt_id = await lock_prompt(conn, tenant_id, name)
            live = await self._live(conn, prompt_id, name, label)
            await self._versions_exist(conn, prompt_id, name, list(weights))
            slots = _allocate(weights, live.slots)
            await conn.execute(
                prompt_experiments.update()
                .where(prompt_experiments.c.id == live.id)
                .values(slots=slots, status="running", updated_at=func.now())
            )
            await _event(conn, live.id, "weights", {"weights": _weights_json(weights)}, author)
            await notify(conn, tenant_id, name)
        await self.publisher.changed(tenant_id, name)
        return await self.get(live.id)

    async def finish(
        self, tenant_id: uuid.UUID, name: str, label: str, status: str, *, author: str, reason: str = ""
    ) -> ExperimentInfo:
        async with self.engine.begin() as conn:
            prompt_id = await lock_prompt(conn, tenant_id, name)
            live = await self._live(conn, prompt_id, name, label)
            await end_live_experiment(conn, prompt_id, label, author, status, reason)
            await notify(conn, tenant_id, name)
        await self.publisher.changed(tenant_id, name)
        return await self.get(live.id)

    async def pause(self, experiment_id: uuid.UUID, details: dict[str, Any]) -> bool:
        """Drop a running canary's share to 0; False when it was no longer running (someone was first)."""
        info = await self.get(experiment_id)
        if info.status != "running" or info.candidate is None:
            return False
        slots = allocate({info.baseline: 100, info.candidate: 0}, info.slots)
        async with self.engine.begin() as conn:
            paused = await conn.execute(
                prompt_experiments.update()
                .where(prompt_experiments.c.id == experiment_id, prompt_experiments.c.status == "running")
                .values(status="paused", slots=slots, updated_at=func.now())
                .returning(prompt_experiments.c.id)
            )
            if paused.scalar_one_or_none() is None:
                return False
            await _event(conn, experiment_id, "paused", details, "keel:auto-pause")
            await notify(conn, info.tenant_id, info.name)
        await self.publisher.changed(info.tenant_id, info.name)
        return True

    async def get(self, experiment_id: uuid.UUID) -> ExperimentInfo:
        query = _info_query().where(prompt_experiments.c.id == experiment_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            raise NotFoundError(f"No experiment {experiment_id}.", code="experiment_not_found")
        return _info(row)

    async def live(self, tenant_id: uuid.UUID, name: str, label: str) -> ExperimentInfo | None:
        """The label's running or paused experiment; else its most recent one (None if it never had one)."""
        query = (
            _info_query()
            .where(prompts.c.tenant_id == tenant_id, prompts.c.name == name)
            .where(prompt_experiments.c.label == label)
            .order_by(prompt_experiments.c.status.in_(LIVE).desc(), prompt_experiments.c.created_at.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        return _info(row) if row is not None else None

    async def events(self, experiment_id: uuid.UUID) -> list[dict[str, Any]]:
        query = (
            select(prompt_experiment_events)
            .where(prompt_experiment_events.c.experiment_id == experiment_id)
            .order_by(prompt_experiment_events.c.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            {
                "event": row.event,
                "details": row.details,
                "author": row.author,
                "created_at": row.created_at.isoformat(),
            }
            for row in rows
        ]

    async def _label_version(self, conn: AsyncConnection, prompt_id: uuid.UUID, name: str, label: str) -> int:
        found = await conn.execute(
            select(prompt_labels.c.version).where(
                prompt_labels.c.prompt_id == prompt_id, prompt_labels.c.label == label
            )
        )
        version = found.scalar_one_or_none()
        if version is None:
            raise NotFoundError(
                f"Prompt {name!r} has no label {label!r}.", param="label", code="label_not_found"
            )
        return int(version)

    async def _versions_exist(
        self, conn: AsyncConnection, prompt_id: uuid.UUID, name: str, versions: list[int]
    ) -> None:
        found = await conn.execute(
            select(prompt_versions.c.version).where(
                prompt_versions.c.prompt_id == prompt_id, prompt_versions.c.version.in_(versions)
            )
        )
        missing = set(versions) - {row.version for row in found}
        if missing:
            raise NotFoundError(
                f"Prompt {name!r} has no version {min(missing)}.", param="weights", code="prompt_not_found"
            )

    async def _live_id(self, conn: AsyncConnection, prompt_id: uuid.UUID, label: str) -> uuid.UUID | None:
        found = await conn.execute(
            select(prompt_experiments.c.id).where(
                prompt_experiments.c.prompt_id == prompt_id,
                prompt_experiments.c.label == label,
                prompt_experiments.c.status.in_(LIVE),
            )
        )
        return found.scalar_one_or_none()

    async def _live(
        self, conn: AsyncConnection, prompt_id: uuid.UUID, name: str, label: str
    ) -> ExperimentInfo:
        found = await self._live_id(conn, prompt_id, label)
        if found is None:
            raise NotFoundError(
                f"Label {label!r} of prompt {name!r} has no live experiment.",
                param="label",
                code="experiment_not_found",
            )
        row = (await conn.execute(_info_query().where(prompt_experiments.c.id == found))).one()
        return _info(row)


def _allocate(weights: dict[int, int], previous: list[int] | None) -> list[int]:
    try:
        return allocate(weights, previous)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="weights") from None


def _weights_json(weights: dict[int, int]) -> dict[str, int]:
    return {str(version): weight for version, weight in sorted(weights.items())}


def _info_query() -> Any:
    return select(prompt_experiments, prompts.c.tenant_id, prompts.c.name).join(
        prompts, prompts.c.id == prompt_experiments.c.prompt_id
    )


def _info(row: Any) -> ExperimentInfo:
    return ExperimentInfo(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        label=row.label,
        kind=row.kind,
        unit=row.unit,
        status=row.status,
        slots=list(row.slots),
        baseline=row.baseline,
        candidate=row.candidate,
        author=row.author,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
