"""Data commands: `keel db`, `keel tenants`, `keel keys`.

With the embedded PostgreSQL they join the server a running `keel serve` uses, or start it themselves
(and stop it when done, unless someone else still uses it): never a second server on the same data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import typer

from keel.db import Database
from keel.errors import KeelError
from keel.settings import TIERS, Settings
from keel.tenants import SCOPES, TenantService
from keel.tenants.keys import parse_duration

T = TypeVar("T")

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)


def run_with_tenants(action: Callable[[TenantService], Awaitable[T]]) -> T:
    async def go() -> T:
        settings = Settings()
        database = Database(settings)
        try:
            engine = await database.open()
            return await action(TenantService(engine, settings))
        finally:
            await database.close()

    try:
        return asyncio.run(go())
    except KeelError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations (serve does this at start too)."""

    async def go() -> None:
        database = Database(Settings())
        try:
            await database.open(migrate=True)
        finally:
            await database.close()

    asyncio.run(go())
    typer.echo("database schema is up to date")


@tenants_app.command("create")
def tenants_create(
    name: str,
    tier: Annotated[str, typer.Option(help=f"One of: {', '.join(TIERS)}.")] = "free",
) -> None:
    """Create a tenant."""
    tenant = run_with_tenants(lambda s: s.create_tenant(name, tier))
    typer.echo(f"created tenant {tenant.name} (tier {tenant.tier}, id {tenant.id})")


@tenants_app.command("list")
def tenants_list() -> None:
    """List tenants."""
    for tenant in run_with_tenants(lambda s: s.list_tenants()):
        models = ",".join(tenant.allowed_models) if tenant.allowed_models else "all models"
        typer.echo(f"{tenant.name}\t{tenant.tier}\t{tenant.created_at:%Y-%m-%d %H:%M}\t{models}")


@tenants_app.command("set-models")
def tenants_set_models(
    name: str,
    models: Annotated[
        str | None, typer.Argument(help="Comma-separated model aliases the tenant's keys may call.")
    ] = None,
    all_models: Annotated[
        bool, typer.Option("--all", help="Allow every alias (within the tenant's tier).")
    ] = False,
) -> None:
    """Set which model aliases a tenant may call (its tier's list and each key's still apply)."""
    if (models is None) == (not all_models):
        typer.echo("give either MODELS (a,b,c) or --all", err=True)
        raise typer.Exit(2)
    names = split_models(models) if models is not None else None
    saved = run_with_tenants(lambda s: s.set_allowed_models(name, names))
    typer.echo(f"tenant {name}: models {', '.join(saved) if saved else 'all (within its tier)'}")


def split_models(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@tenants_app.command("update")
def tenants_update(
    name: str,
    audit_content: Annotated[
        bool | None,
        typer.Option(
            "--audit-content/--no-audit-content",
            help="Keep message content in audit records, or metadata only.",
        ),
    ] = None,
) -> None:
    """Change a tenant's settings."""
    if audit_content is None:
        typer.echo("nothing to change: give --audit-content or --no-audit-content", err=True)
        raise typer.Exit(2)
    run_with_tenants(lambda s: s.set_audit_content(name, audit_content))
    typer.echo(f"tenant {name}: audit records keep {'content' if audit_content else 'metadata only'}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    scope: Annotated[str, typer.Option(help=f"One of: {', '.join(SCOPES)}.")] = "chat",
    label: Annotated[str, typer.Option(help="A note to tell keys apart.")] = "",
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 90d, 12h, 30m, 2w (default: never expires).")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated model aliases this key may call (default: the tenant's)."),
    ] = None,
) -> None:
    """Create an API key. It is printed once, as the last line: store it now."""
    try:
        lifetime = parse_duration(expires) if expires is not None else None
    except ValueError as exc:
        typer.echo(f"error: --expires: {exc}", err=True)
        raise typer.Exit(2) from None
    allowed = split_models(models) if models is not None else None
    info, secret = run_with_tenants(
        lambda s: s.create_key(tenant, scope, label, expires_in=lifetime, allowed_models=allowed)
    )
    until = f", expires {info.expires_at:%Y-%m-%d %H:%M} UTC" if info.expires_at else ""
    only = f", models {','.join(info.allowed_models)}" if info.allowed_models else ""
    typer.echo(
        f"created {info.scope} key {info.prefix}… (id {info.id}) for tenant {info.tenant}{until}{only}; "
        "it will not be shown again:"
    )
    typer.echo(secret)


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """List a tenant's keys (id, prefix, scope, state, expiry, models, last use, label)."""
    now = datetime.now(UTC)
    for key in run_with_tenants(lambda s: s.list_keys(tenant)):
        used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
        until = f"expires {key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "no expiry"
        models = ",".join(key.allowed_models) if key.allowed_models else "all models"
        typer.echo(
            f"{key.id}\t{key.prefix}\t{key.scope}\t{key.state(now)}\t{until}\t{models}\t"
            f"last used {used}\t{key.label}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id, or its prefix (with --tenant).")],
    tenant: Annotated[
        str | None, typer.Option(help="The key's tenant: required with a prefix, optional with an id.")
    ] = None,
) -> None:
    """Revoke a key by id, or by prefix within one tenant. Running servers refuse it within their auth
    cache TTL (10 s)."""
    count = run_with_tenants(lambda s: s.revoke(key, tenant))
    if count == 0:
        where = f" of tenant {tenant}" if tenant else ""
        typer.echo(f"no active key{where} matches {key}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {count} key(s)")
