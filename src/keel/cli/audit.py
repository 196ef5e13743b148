"""`keel replay` and `keel audit prune`: operator tools over the audit records.

Like the other data commands they run from the same settings as `serve`, with or without a running server:
`keel replay` builds Keel's components in-process (database, models, pipeline) and records the replay.
"""

from __future__ import annotations

import asyncio
import shutil
import textwrap
from contextlib import AsyncExitStack
from typing import Annotated, Any

import typer

from keel.db import Database
from keel.errors import KeelError
from keel.settings import Settings
from keel.telemetry.audit_store import AuditStore

audit_app = typer.Typer(help="Audit records of model calls.", no_args_is_help=True)


@audit_app.command("prune")
def prune(
    older_than: Annotated[
        float | None, typer.Option("--older-than", help="Days to keep (default: audit_retention_days).")
    ] = None,
) -> None:
    """Delete audit records older than DAYS."""
    settings = Settings()
    days = older_than if older_than is not None else settings.audit_retention_days

    async def go() -> int:
        database = Database(settings)
        try:
            return await AuditStore(await database.open()).prune(days)
        finally:
            await database.close()

    typer.echo(f"removed {asyncio.run(go())} audit records older than {days:g} days")


def replay(
    request_id: str,
    model: Annotated[
        str | None, typer.Option(help="Send it to this alias instead of the original model.")
    ] = None,
) -> None:
    """Send a recorded request again, exactly as it went upstream, and compare the replies."""
    from keel.app import Telemetry, build_components  # the app stack only when this command runs

    settings = Settings()

    async def go() -> dict[str, Any]:
        async with AsyncExitStack() as stack:
            keel = await build_components(settings, stack, Telemetry(settings))
            tenants = await keel.audit.tenants_with(request_id)
            if not tenants:
                raise KeelError(f"no recorded request {request_id!r}")
            if len(tenants) > 1:
                raise KeelError(  # only a client's own id can be: Keel's ids are unique
                    f"client request id {request_id!r} exists in {len(tenants)} tenants; it is ambiguous: "
                    "use Keel's request id (the x-request-id response header, `id` in the audit record)"
                )
            return await keel.replayer.replay(tenants[0], request_id, model)

    try:
        result = asyncio.run(go())
    except KeelError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    _show(result)


def _show(result: dict[str, Any]) -> None:
    original, new = result["original"], result["replay"]
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    left = [f"original {original['id']} ({original['model']})", *_wrap(original["text"], width)]
    right = [f"replay {new['id']} ({new['model']})", *_wrap(new["text"], width)]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        typer.echo(f"{a:<{width}} | {b}")
    typer.echo("")
    typer.echo("identical" if result["identical"] else result["diff"])


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width) or [""])
    return lines
