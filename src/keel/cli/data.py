"""Data commands: `keel db`, `keel tenants`, `keel keys`.

With the embedded PostgreSQL they join the server a running `keel serve` uses, or start it themselves
(and stop it when done, unless someone else still uses it): never a second server on the same data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from keel.db import Database
from keel.errors import KeelError
from keel.settings import TIERS, Settings
from keel.tenants import SCOPES, TenantService

T = TypeVar("T")

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)


def run_with_tenants(action: Callable[[TenantService], Awaitable[T]]) -> T:
    async def go() -> T:
        database = Database(Settings())
        try:
            engine = await database.open()
            return await action(TenantService(engine))
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
        typer.echo(f"{tenant.name}\t{tenant.tier}\t{tenant.created_at:%Y-%m-%d %H:%M}")


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
) -> None:
    """Create an API key. It is printed once, as the last line: store it now."""
    info, secret = run_with_tenants(lambda s: s.create_key(tenant, scope, label))
    typer.echo(
        f"created {info.scope} key {info.prefix}… for tenant {info.tenant}; it will not be shown again:"
    )
    typer.echo(secret)


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """List a tenant's keys (prefixes only)."""
    for key in run_with_tenants(lambda s: s.list_keys(tenant)):
        state = "revoked" if key.revoked_at else "active"
        used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
        typer.echo(f"{key.prefix}\t{key.scope}\t{state}\tlast used {used}\t{key.label}")


@keys_app.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke the key with this prefix. Running servers refuse it within their auth cache TTL (10 s)."""
    count = run_with_tenants(lambda s: s.revoke(prefix))
    if count == 0:
        typer.echo(f"no active key starts with {prefix}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {count} key(s)")
