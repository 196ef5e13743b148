"""Tenants and their API keys in PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.db.tables import api_keys, tenants
from keel.errors import InvalidRequestError, NotFoundError
from keel.settings import TIERS, Settings
from keel.tenants import keys
from keel.tenants.principal import Principal, narrow

SCOPES = ("chat", "admin")


@dataclass(frozen=True, slots=True)
class Tenant:
    id: uuid.UUID
    name: str
    tier: str
    created_at: datetime
    allowed_models: list[str] | None = None


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
    expires_at: datetime | None = None
    allowed_models: list[str] | None = None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= now else "active"


def _key_info(row: Any, tenant: str) -> KeyInfo:
    return KeyInfo(
        row.id,
        tenant,
        row.prefix,
        row.scope,
        row.label,
        row.created_at,
        row.revoked_at,
        row.last_used_at,
        row.expires_at,
        row.allowed_models,
    )


def _tenant(row: Any) -> Tenant:
    return Tenant(row.id, row.name, row.tier, row.created_at, row.allowed_models)


class TenantService:
    """`settings`, when given: tier model lists apply at authentication, and model lists given to keys
    and tenants are checked against the configured aliases."""

    def __init__(self, engine: AsyncEngine, settings: Settings | None = None) -> None:
        self._engine = engine
        self._tier_models = {name: t.allowed_models for name, t in settings.tiers.items()} if settings else {}
        self._aliases = frozenset(settings.models) if settings else None

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
        return _tenant(row)

    async def get_tenant(self, name: str) -> Tenant:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(tenants).where(tenants.c.name == name))).one_or_none()
        if row is None:
            raise NotFoundError(f"no tenant named {name!r}", param="tenant")
        return _tenant(row)

    async def list_tenants(self) -> list[Tenant]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(tenants).order_by(tenants.c.name))).all()
        return [_tenant(r) for r in rows]

    async def create_key(
        self,
        tenant: str,
        scope: str = "chat",
        label: str = "",
        *,
        expires_in: timedelta | None = None,
        allowed_models: Sequence[str] | None = None,
    ) -> tuple[KeyInfo, str]:
        """Returns the key's record and its secret, which is never retrievable again."""
        if scope not in SCOPES:
            raise InvalidRequestError(f"scope must be one of {', '.join(SCOPES)}", param="scope")
        if expires_in is not None and expires_in <= timedelta(0):
            raise InvalidRequestError("a key's lifetime must be positive", param="expires_in")
        models = self._model_list(allowed_models)
        owner = await self.get_tenant(tenant)
        new = keys.generate()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    api_keys.insert()
                    .values(
                        tenant_id=owner.id,
                        prefix=new.prefix,
                        key_hash=new.digest,
                        scope=scope,
                        label=label,
                        expires_at=None if expires_in is None else func.now() + expires_in,
                        allowed_models=models,
                    )
                    .returning(*api_keys.c)
                )
            ).one()
        return _key_info(row, owner.name), new.secret

    def _model_list(self, names: Sequence[str] | None) -> list[str] | None:
        """Stripped, unique, sorted; None for an empty list (every alias); unknown aliases refused."""
        cleaned = sorted({name.strip() for name in names or () if name.strip()})
        unknown = [name for name in cleaned if self._aliases is not None and name not in self._aliases]
        if unknown:
            raise InvalidRequestError(
                f"unknown model alias(es): {', '.join(unknown)}", param="allowed_models"
            )
        return cleaned or None

    async def set_allowed_models(self, name: str, models: Sequence[str] | None) -> list[str] | None:
        """The aliases this tenant's keys may call (None or empty: every alias its tier allows)."""
        cleaned = self._model_list(models)
        await self._update_tenant(name, allowed_models=cleaned)
        return cleaned

    async def set_audit_content(self, name: str, enabled: bool) -> None:
        """Whether audit records of this tenant keep message content (False: metadata only)."""
        await self._update_tenant(name, audit_content=enabled)

    async def _update_tenant(self, name: str, **values: Any) -> None:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(tenants).where(tenants.c.name == name).values(**values).returning(tenants.c.id)
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
        return [_key_info(r, owner.name) for r in rows]

    async def revoke_id(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> bool:
        """Revoke one key of this tenant (already revoked: still True); False when the tenant has no such
        key, so another tenant's key is indistinguishable from a missing one."""
        async with self._engine.begin() as conn:
            found = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.tenant_id == tenant_id)
                .values(revoked_at=func.coalesce(api_keys.c.revoked_at, func.now()))
                .returning(api_keys.c.id)
            )
            return found.one_or_none() is not None

    async def revoke(self, key: str, tenant: str | None = None) -> int:
        """Revoke by id (a UUID: within `tenant` when given) or by prefix (within `tenant`, required).
        Returns how many live keys were revoked; a prefix too short to be deliberate is refused."""
        try:
            key_id: uuid.UUID | None = uuid.UUID(key)
        except ValueError:
            key_id = None
        query = update(api_keys).where(api_keys.c.revoked_at.is_(None))
        if key_id is not None:
            query = query.where(api_keys.c.id == key_id)
        else:
            if tenant is None:
                raise InvalidRequestError("revoking by prefix needs the key's tenant", param="tenant")
            if len(key) < len(keys.KEY_PREFIX) + 4:
                raise InvalidRequestError(
                    f"give at least {len(keys.KEY_PREFIX) + 4} characters of the key prefix, or its id",
                    param="prefix",
                )
            visible = key[: len(keys.KEY_PREFIX) + keys.VISIBLE_CHARS]
            query = query.where(api_keys.c.prefix.startswith(visible, autoescape=True))
        if tenant is not None:
            query = query.where(api_keys.c.tenant_id == (await self.get_tenant(tenant)).id)
        async with self._engine.begin() as conn:
            result = await conn.execute(query.values(revoked_at=func.now()).returning(api_keys.c.id))
            return len(result.all())

    async def authenticate(self, secret: str) -> Principal | None:
        """One indexed lookup by hash; the gateway caches the answer. An expired key is returned with
        its `expires_at`: the caller refuses it (and says why)."""
        query = (
            select(
                api_keys.c.id,
                api_keys.c.scope,
                api_keys.c.label,
                api_keys.c.expires_at,
                api_keys.c.allowed_models,
                tenants.c.id.label("tenant_id"),
                tenants.c.name,
                tenants.c.tier,
                tenants.c.audit_content,
                tenants.c.allowed_models.label("tenant_models"),
            )
            .join(tenants, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.key_hash == keys.digest(secret))
            .where(api_keys.c.revoked_at.is_(None))
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            return None
        return Principal(
            row.tenant_id,
            row.name,
            row.tier,
            row.id,
            row.scope,
            row.label,
            row.audit_content,
            narrow(self._tier_models.get(row.tier), row.tenant_models, row.allowed_models),
            row.expires_at.timestamp() if row.expires_at is not None else None,
        )

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
