"""Prompts, versions and labels in PostgreSQL. Every change notifies in its own transaction.

A change to a prompt runs `pg_notify(CHANNEL, {"tenant", "name"})` before it commits, so every Keel process
listening hears of it exactly when the change becomes visible, never before. Writers of one prompt take a
row lock on it: version numbers and label moves are serialised per prompt.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keel.db.tables import prompt_experiments, prompt_label_moves, prompt_labels, prompt_versions, prompts
from keel.errors import NotFoundError
from keel.prompts.changes import ChangePublisher, NoPublisher, lock_prompt, notify
from keel.prompts.experiment_store import end_live_experiment
from keel.prompts.experiments import Experiment
from keel.prompts.spec import LATEST, PromptSpec


@dataclass(frozen=True, slots=True)
class StoredVersion:
    name: str
    version: int
    template: Any  # a string, or [{role, content}]
    variables: dict[str, dict[str, Any]]
    config: dict[str, Any]
    description: str
    tags: list[str]
    author: str
    content_hash: str
    created_at: datetime

    def json(self) -> dict[str, Any]:
        return {
            "object": "prompt.version",
            "name": self.name,
            "version": self.version,
            "template": self.template if isinstance(self.template, str) else None,
            "messages": self.template if not isinstance(self.template, str) else None,
            "variables": self.variables,
            "model": {k: v for k, v in self.config.items() if k != "retrieval"},
            "retrieval": self.config.get("retrieval"),
            "description": self.description,
            "tags": self.tags,
            "author": self.author,
            "content_hash": self.content_hash,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class LabelMove:
    label: str
    from_version: int | None
    to_version: int | None
    author: str
    reason: str
    forced: bool
    created_at: datetime

    def json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "from": self.from_version,
            "to": self.to_version,
            "author": self.author,
            "reason": self.reason,
            "forced": self.forced,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class LabelState:
    """What the resolver caches per (tenant, prompt, label): where it points, and its live experiment."""

    prompt_exists: bool
    version: int | None
    experiment: Experiment | None = None


class PromptStore:
    def __init__(self, engine: AsyncEngine, publisher: ChangePublisher | None = None) -> None:
        self.engine = engine
        self.publisher = publisher or NoPublisher()

    async def push(self, tenant_id: uuid.UUID, spec: PromptSpec, author: str) -> tuple[StoredVersion, bool]:
        """Store `spec` as the next version; identical content returns the existing version (False)."""
        digest = spec.content_hash()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(prompts).values(tenant_id=tenant_id, name=spec.name).on_conflict_do_nothing()
            )
            prompt_id = await lock_prompt(conn, tenant_id, spec.name)
            same = await conn.execute(
                select(prompt_versions.c.version).where(
                    prompt_versions.c.prompt_id == prompt_id, prompt_versions.c.content_hash == digest
                )
            )
            existing = same.scalar_one_or_none()
            if existing is not None:
                return await self._version(conn, tenant_id, spec.name, existing), False
            newest = await conn.execute(
                select(func.coalesce(func.max(prompt_versions.c.version), 0)).where(
                    prompt_versions.c.prompt_id == prompt_id
                )
            )
            number = int(newest.scalar_one()) + 1
            await conn.execute(
                prompt_versions.insert().values(
                    prompt_id=prompt_id,
                    version=number,
                    template=spec.template_json(),
                    variables=spec.variables_json(),
                    config=spec.config(),
                    description=spec.description,
                    tags=spec.tags,
                    author=author,
                    content_hash=digest,
                )
            )
            await notify(conn, tenant_id, spec.name)  # `latest` moved
            stored = await self._version(conn, tenant_id, spec.name, number)
        await self.publisher.changed(tenant_id, spec.name)
        return stored, True

    async def version(self, tenant_id: uuid.UUID, name: str, version: int) -> StoredVersion:
        async with self.engine.connect() as conn:
            return await self._version(conn, tenant_id, name, version)

    async def _version(
        self, conn: AsyncConnection, tenant_id: uuid.UUID, name: str, version: int
    ) -> StoredVersion:
        query = (
            select(prompt_versions)
            .join(prompts, prompts.c.id == prompt_versions.c.prompt_id)
            .where(prompts.c.tenant_id == tenant_id, prompts.c.name == name)
            .where(prompt_versions.c.version == version)
        )
        row = (await conn.execute(query)).one_or_none()
        if row is None:
            raise NotFoundError(
                f"Prompt {name!r} has no version {version}.", param="version", code="prompt_not_found"
            )
        return _stored(name, row)

    async def versions(self, tenant_id: uuid.UUID, name: str) -> list[StoredVersion]:
        query = (
            select(prompt_versions)
            .join(prompts, prompts.c.id == prompt_versions.c.prompt_id)
            .where(prompts.c.tenant_id == tenant_id, prompts.c.name == name)
            .order_by(prompt_versions.c.version)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            raise NotFoundError(f"No prompt {name!r}.", param="name", code="prompt_not_found")
        return [_stored(name, row) for row in rows]

    async def label_state(self, tenant_id: uuid.UUID, name: str, label: str) -> LabelState:
        """One round trip: the prompt, where the label points (`latest`: the newest), its live experiment."""
        if label == LATEST:
            pointed = select(func.max(prompt_versions.c.version)).where(
                prompt_versions.c.prompt_id == prompts.c.id
            )
        else:
            pointed = select(prompt_labels.c.version).where(
                prompt_labels.c.prompt_id == prompts.c.id, prompt_labels.c.label == label
            )
        running = prompt_experiments.c
        query = (
            select(pointed.scalar_subquery().label("pointed"), prompt_experiments)
            .select_from(
                prompts.outerjoin(
                    prompt_experiments,
                    (running.prompt_id == prompts.c.id)
                    & (running.label == label)
                    & (running.status == "running"),
                )
            )
            .where(prompts.c.tenant_id == tenant_id, prompts.c.name == name)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            return LabelState(prompt_exists=False, version=None)
        live = None
        if row.id is not None:
            live = Experiment(
                id=row.id,
                kind=row.kind,
                unit=row.unit,
                status=row.status,
                slots=tuple(row.slots),
                baseline=row.baseline,
                candidate=row.candidate,
            )
        return LabelState(prompt_exists=True, version=row.pointed, experiment=live)

    async def labels(self, tenant_id: uuid.UUID, name: str) -> dict[str, int]:
        query = (
            select(prompt_labels.c.label, prompt_labels.c.version)
            .join(prompts, prompts.c.id == prompt_labels.c.prompt_id)
            .where(prompts.c.tenant_id == tenant_id, prompts.c.name == name)
            .order_by(prompt_labels.c.label)
        )
        async with self.engine.connect() as conn:
            return {row.label: row.version for row in await conn.execute(query)}

    async def move_label(
        self,
        tenant_id: uuid.UUID,
        name: str,
        label: str,
        version: int | None,
        *,
        author: str,
        reason: str = "",
        forced: bool = False,
        ends_experiment_as: str = "ended",
    ) -> LabelMove | None:
        """Point `label` at `version` (None removes it) and record the move; None when nothing changed.

        A live experiment on the label ends with the move: its variants were chosen against the old target.
        """
        async with self.engine.begin() as conn:
            prompt_id = await lock_prompt(conn, tenant_id, name)
            if version is not None:
                await self._version(conn, tenant_id, name, version)  # 404 for an unknown version
            current = (
                await conn.execute(
                    select(prompt_labels.c.version).where(
                        prompt_labels.c.prompt_id == prompt_id, prompt_labels.c.label == label
                    )
                )
            ).scalar_one_or_none()
            if current == version:
                if version is None:
                    raise NotFoundError(
                        f"Prompt {name!r} has no label {label!r}.", param="label", code="label_not_found"
                    )
                return None
            if version is None:
                await conn.execute(
                    prompt_labels.delete().where(
                        prompt_labels.c.prompt_id == prompt_id, prompt_labels.c.label == label
                    )
                )
            else:
                upsert = insert(prompt_labels).values(prompt_id=prompt_id, label=label, version=version)
                await conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["prompt_id", "label"],
                        set_={"version": version, "moved_at": func.now()},
                    )
                )
            moved = await conn.execute(
                prompt_label_moves.insert()
                .values(
                    prompt_id=prompt_id,
                    label=label,
                    from_version=current,
                    to_version=version,
                    author=author,
                    reason=reason,
                    forced=forced,
                )
                .returning(prompt_label_moves.c.created_at)
            )
            await end_live_experiment(
                conn, prompt_id, label, author, ends_experiment_as, f"label moved to {version}"
            )
            await notify(conn, tenant_id, name)
        await self.publisher.changed(tenant_id, name)
        return LabelMove(label, current, version, author, reason, forced, moved.scalar_one())

    async def last_move(self, tenant_id: uuid.UUID, name: str, label: str) -> LabelMove | None:
        query = (
            select(prompt_label_moves)
            .join(prompts, prompts.c.id == prompt_label_moves.c.prompt_id)
            .where(prompts.c.tenant_id == tenant_id, prompts.c.name == name)
            .where(prompt_label_moves.c.label == label)
            .order_by(prompt_label_moves.c.id.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        return _move(row) if row is not None else None

    async def moves(self, tenant_id: uuid.UUID, name: str) -> list[LabelMove]:
        query = (
            select(prompt_label_moves)
            .join(prompts, prompts.c.id == prompt_label_moves.c.prompt_id)
            .where(prompts.c.tenant_id == tenant_id, prompts.c.name == name)
            .order_by(prompt_label_moves.c.id)
        )
        async with self.engine.connect() as conn:
            return [_move(row) for row in await conn.execute(query)]

    async def list(self, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
        """Every prompt of the tenant: newest version, labels, last change."""
        newest = (
            select(
                prompt_versions.c.prompt_id,
                func.max(prompt_versions.c.version).label("latest"),
                func.max(prompt_versions.c.created_at).label("updated_at"),
            )
            .group_by(prompt_versions.c.prompt_id)
            .subquery()
        )
        labels = (
            select(
                prompt_labels.c.prompt_id,
                func.jsonb_object_agg(prompt_labels.c.label, prompt_labels.c.version).label("labels"),
            )
            .group_by(prompt_labels.c.prompt_id)
            .subquery()
        )
        query = (
            select(prompts.c.name, newest.c.latest, newest.c.updated_at, labels.c.labels)
            .join(newest, newest.c.prompt_id == prompts.c.id)
            .outerjoin(labels, labels.c.prompt_id == prompts.c.id)
            .where(prompts.c.tenant_id == tenant_id)
            .order_by(prompts.c.name)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            {
                "object": "prompt",
                "name": row.name,
                "latest": row.latest,
                "labels": dict(sorted((row.labels or {}).items())),
                "updated_at": row.updated_at.isoformat(),
            }
            for row in rows
        ]


def _stored(name: str, row: Any) -> StoredVersion:
    return StoredVersion(
        name=name,
        version=row.version,
        template=row.template,
        variables=row.variables,
        config=row.config,
        description=row.description,
        tags=list(row.tags),
        author=row.author,
        content_hash=row.content_hash,
        created_at=row.created_at,
    )


def _move(row: Any) -> LabelMove:
    return LabelMove(
        row.label, row.from_version, row.to_version, row.author, row.reason, row.forced, row.created_at
    )
