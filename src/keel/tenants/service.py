"""Tenants and their API keys in PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.tables import api_keys, tenants
from keel.errors import InvalidRequestError, NotFoundError
from keel.settings import TIERS
from keel.tenants import keys

SCOPES = ("chat", "admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's tenant and scope. Cached by the gateway, so immutable."""

    tenant_id: uuid.UUID
    tenant: str
    tier: str
    key_id: uuid.UUID
    scope: str
    label: str
    audit_content: bool = True  # False: audit records keep metadata only, no message content


@dataclass(frozen=True, slots=True)
class Tenant:
    id: uuid.UUID
    name: str
    tier: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: uuid.UUID
    tenant: str
    prefix: str
    scope: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class TenantService:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create_tenant(self, name: str, tier: str = "free") -> Tenant:
        name = name.strip()
        if not name:
            raise InvalidRequestError("tenant name must not be empty", param="name")
        if tier not in TIERS:
            raise InvalidRequestError(f"tier must be one of {', '.join(TIERS)}", param="tier")
        try:
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(tenants.insert().values(name=name, tier=tier).returning(*tenants.c))
                ).one()
        except IntegrityError as exc:
            raise InvalidRequestError(f"tenant {name!r} already exists", param="name") from exc
        return Tenant(row.id, row.name, row.tier, row.created_at)

    async def get_tenant(self, name: str) -> Tenant:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(tenants).where(tenants.c.name == name))).one_or_none()
        if row is None:
            raise NotFoundError(f"no tenant named {name!r}", param="tenant")
        return Tenant(row.id, row.name, row.tier, row.created_at)

    async def list_tenants(self) -> list[Tenant]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(tenants).order_by(tenants.c.name))).all()
        return [Tenant(r.id, r.name, r.tier, r.created_at) for r in rows]

    async def create_key(self, tenant: str, scope: str = "chat", label: str = "") -> tuple[KeyInfo, str]:
        """Returns the key's record and its secret, which is never retrievable again."""
        if scope not in SCOPES:
            raise InvalidRequestError(f"scope must be one of {', '.join(SCOPES)}", param="scope")
        owner = await self.get_tenant(tenant)
        new = keys.generate()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    api_keys.insert()
                    .values(
                        tenant_id=owner.id, prefix=new.prefix, key_hash=new.digest, scope=scope, label=label
                    )
                    .returning(*api_keys.c)
                )
            ).one()
        info = KeyInfo(row.id, owner.name, row.prefix, row.scope, row.label, row.created_at, None, None)
        return info, new.secret

    async def set_audit_content(self, name: str, enabled: bool) -> None:
        """Whether audit records of this tenant keep message content (False: metadata only)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(tenants)
                .where(tenants.c.name == name)
                .values(audit_content=enabled)
                .returning(tenants.c.id)
            )
            if result.one_or_none() is None:
                raise NotFoundError(f"no tenant named {name!r}", param="tenant")

    async def list_keys(self, tenant: str) -> list[KeyInfo]:
        owner = await self.get_tenant(tenant)
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(api_keys).where(api_keys.c.tenant_id == owner.id).order_by(api_keys.c.created_at)
                )
            ).all()
        return [
            KeyInfo(r.id, owner.name, r.prefix, r.scope, r.label, r.created_at, r.revoked_at, r.last_used_at)
            for r in rows
        ]

    async def revoke(self, prefix: str) -> int:
        """Revoke every live key starting with `prefix`; refuse a prefix too short to be deliberate."""
        if len(prefix) < len(keys.KEY_PREFIX) + 4:
            raise InvalidRequestError(
                f"give at least {len(keys.KEY_PREFIX) + 4} characters of the key prefix", param="prefix"
            )
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.prefix.startswith(prefix[: len(keys.KEY_PREFIX) + keys.VISIBLE_CHARS]))
                .where(api_keys.c.revoked_at.is_(None))
                .values(revoked_at=func.now())
                .returning(api_keys.c.id)
            )
            return len(result.all())

    async def authenticate(self, secret: str) -> Principal | None:
        """One indexed lookup by hash; the gateway caches the answer."""
        query = (
            select(
                api_keys.c.id,
                api_keys.c.scope,
                api_keys.c.label,
                tenants.c.id.label("tenant_id"),
                tenants.c.name,
                tenants.c.tier,
                tenants.c.audit_content,
            )
            .join(tenants, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.key_hash == keys.digest(secret))
            .where(api_keys.c.revoked_at.is_(None))
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            return None
        return Principal(row.tenant_id, row.name, row.tier, row.id, row.scope, row.label, row.audit_content)

    async def record_last_used(self, used: dict[uuid.UUID, datetime]) -> None:
        """One transaction per flush for all keys seen since the last, instead of a write per request."""
        if not used:
            return
        async with self._engine.begin() as conn:
            for key_id, when in used.items():
                await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=when))

    async def bootstrap(self) -> str | None:
        """On an empty database: tenant `default` (enterprise) and one admin key, returned once."""
        async with self._engine.begin() as conn:
            if (await conn.execute(select(func.count()).select_from(tenants))).scalar_one():
                return None
            inserted = (
                await conn.execute(
                    insert(tenants)
                    .values(name="default", tier="enterprise")
                    .on_conflict_do_nothing(index_elements=["name"])
                    .returning(tenants.c.id)
                )
            ).one_or_none()
            if inserted is None:  # another replica won the race and printed its key
                return None
            new = keys.generate()
            await conn.execute(
                api_keys.insert().values(
                    tenant_id=inserted.id,
                    prefix=new.prefix,
                    key_hash=new.digest,
                    scope="admin",
                    label="bootstrap admin",
                )
            )
        return new.secret
