"""`keel prompts`: prompts as code. Push files from git, promote, roll back, run experiments and canaries.

Like the other data commands these work on the database from the same settings as `serve`, with or
without a running server; running servers hear of every change within a second (LISTEN/NOTIFY or Redis).
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from keel.cli.prompts_output import show_history, show_status, show_version
from keel.db import Database
from keel.errors import KeelError
from keel.prompts import PromptFileError, PromptRegistry, load_prompt_file
from keel.prompts.changes import ChangePublisher
from keel.settings import Settings
from keel.tenants import TenantService

T = TypeVar("T")

prompts_app = typer.Typer(
    help="Versioned prompts: push, promote, roll back, experiments, canaries.", no_args_is_help=True
)
experiment_app = typer.Typer(
    help="Split a label across versions by weight, sticky per unit.", no_args_is_help=True
)
canary_app = typer.Typer(
    help="Give a new version a small share of a label; it pauses itself when worse.", no_args_is_help=True
)
prompts_app.add_typer(experiment_app, name="experiment")
prompts_app.add_typer(canary_app, name="canary")

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant name.")]
Label = Annotated[str, typer.Option("--label", help="The label to act on.")]
Reason = Annotated[str, typer.Option("--reason", help="Why; kept in the history.")]
Unit = Annotated[str, typer.Option("--unit", help="Sticky per: tenant, user or conversation.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _author() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in some containers
        return "cli"


def run(tenant: str, action: Callable[[PromptRegistry, uuid.UUID], Awaitable[T]]) -> T:
    """Open the database, find the tenant, run `action(registry, tenant_id)`; errors exit 1."""

    async def go() -> T:
        settings = Settings()
        database = Database(settings)
        publisher: ChangePublisher | None = None
        redis = None
        try:
            engine = await database.open()
            if settings.redis_url is not None:
                from redis.asyncio import Redis

                from keel.prompts.invalidation import RedisPublisher

                redis = Redis.from_url(settings.redis_url.get_secret_value())
                publisher = RedisPublisher(redis)
            found = await TenantService(engine).get_tenant(tenant)
            return await action(PromptRegistry(engine, publisher=publisher), found.id)
        finally:
            if redis is not None:
                await redis.aclose()
            await database.close()

    try:
        return asyncio.run(go())
    except KeelError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


def _weights(text: str) -> dict[int, int]:
    """`4=50,5=50` → {4: 50, 5: 50}."""
    weights: dict[int, int] = {}
    try:
        for part in text.split(","):
            version, _, weight = part.partition("=")
            weights[int(version)] = int(weight)
    except ValueError:
        raise typer.BadParameter(f"expected VERSION=WEIGHT,... such as 4=50,5=50, not {text!r}") from None
    return weights


def _echo_json(data: Any) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _echo_move(move: dict[str, Any]) -> None:
    if not move["changed"]:
        typer.echo(f"{move['name']}: {move['label']} already at {move['version']}")
        return
    target = "removed" if move["to"] is None else f"-> {move['to']}"
    source = move["from"] if move["from"] is not None else "(new)"
    forced = " (forced)" if move["forced"] else ""
    typer.echo(f"{move['name']}: {move['label']} {source} {target}{forced}")


@prompts_app.command("push")
def push(
    files: Annotated[list[Path], typer.Argument(help="YAML or Markdown files.")], tenant: Tenant = "default"
) -> None:
    """Push prompt files; identical content is not a new version. Prints NAME@VERSION for each."""
    try:
        specs = [spec for path in files for spec in load_prompt_file(path)]
    except PromptFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None

    async def go(registry: PromptRegistry, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
        return [await registry.push(tenant_id, spec, _author()) for spec in specs]

    for pushed in run(tenant, go):
        note = "" if pushed["created"] else "  (unchanged)"
        typer.echo(f"{pushed['name']}@{pushed['version']}{note}")
        for move in pushed["labels"]:
            _echo_move(move)


@prompts_app.command("list")
def list_prompts(tenant: Tenant = "default", as_json: AsJson = False) -> None:
    """The tenant's prompts, their newest version and labels."""
    found = run(tenant, lambda registry, tenant_id: registry.list(tenant_id))
    if as_json:
        _echo_json(found)
        return
    for prompt in found:
        labels = " ".join(f"{label}={version}" for label, version in prompt["labels"].items())
        typer.echo(f"{prompt['name']}\tlatest={prompt['latest']}\t{labels}")


@prompts_app.command("show")
def show(
    ref: Annotated[str, typer.Argument(metavar="NAME[@LABEL|@VERSION]")],
    tenant: Tenant = "default",
    as_json: AsJson = False,
) -> None:
    """One version: by number, by label, or the newest."""
    name, _, at = ref.partition("@")
    version = int(at) if at.isdigit() else None
    label = at if at and version is None else None
    found = run(
        tenant, lambda registry, tenant_id: registry.show(tenant_id, name, label=label, version=version)
    )
    if as_json:
        _echo_json(found)
    else:
        show_version(found)


@prompts_app.command("history")
def history(name: str, tenant: Tenant = "default", as_json: AsJson = False) -> None:
    """Versions and label moves, oldest first."""
    found = run(tenant, lambda registry, tenant_id: registry.history(tenant_id, name))
    if as_json:
        _echo_json(found)
    else:
        show_history(found)


@prompts_app.command("diff")
def diff(name: str, old: int, new: int, tenant: Tenant = "default") -> None:
    """Unified diff of two versions' template, variables and model config."""
    typer.echo(run(tenant, lambda registry, tenant_id: registry.diff(tenant_id, name, old, new)))


@prompts_app.command("promote")
def promote(
    name: str,
    version: int,
    label: Label = "production",
    force: Annotated[bool, typer.Option("--force", help="Override a refusing promotion gate.")] = False,
    reason: Reason = "",
    tenant: Tenant = "default",
) -> None:
    """Point a label at a version. Promotions to production pass the gate."""
    move = run(
        tenant,
        lambda registry, tenant_id: registry.promote(
            tenant_id, name, version, label, _author(), reason, force=force
        ),
    )
    _echo_move(move)


@prompts_app.command("rollback")
def rollback(name: str, label: Label = "production", reason: Reason = "", tenant: Tenant = "default") -> None:
    """Move a label back to where it pointed before its last move."""
    _echo_move(
        run(tenant, lambda registry, tenant_id: registry.rollback(tenant_id, name, label, _author(), reason))
    )


@prompts_app.command("unlabel")
def unlabel(name: str, label: str, reason: Reason = "", tenant: Tenant = "default") -> None:
    """Remove a label; requests naming it get a 404 from then on."""
    _echo_move(
        run(tenant, lambda registry, tenant_id: registry.unlabel(tenant_id, name, label, _author(), reason))
    )


@experiment_app.command("start")
def experiment_start(
    name: str,
    weights: Annotated[str, typer.Option("--weights", help="VERSION=WEIGHT,... summing to 100.")],
    label: Label = "production",
    unit: Unit = "user",
    tenant: Tenant = "default",
) -> None:
    """Split a label across versions by weight."""
    split = _weights(weights)
    info = run(
        tenant,
        lambda registry, tenant_id: registry.start_experiment(
            tenant_id, name, label, split, unit=unit, author=_author()
        ),
    )
    typer.echo(f"experiment {info['id']} on {name}@{label}: {_split(info)} per {info['unit']}")


@experiment_app.command("weights")
def experiment_weights(
    name: str,
    weights: Annotated[str, typer.Argument(help="VERSION=WEIGHT,... summing to 100.")],
    label: Label = "production",
    tenant: Tenant = "default",
) -> None:
    """Change the weights; only the units that must move do. Resumes a paused canary."""
    split = _weights(weights)
    info = run(
        tenant,
        lambda registry, tenant_id: registry.set_weights(tenant_id, name, label, split, author=_author()),
    )
    typer.echo(f"{name}@{label}: {_split(info)} ({info['status']})")


@experiment_app.command("stop")
def experiment_stop(
    name: str, label: Label = "production", reason: Reason = "", tenant: Tenant = "default"
) -> None:
    """End the experiment; the label serves its own version again."""
    run(
        tenant,
        lambda registry, tenant_id: registry.stop_experiment(
            tenant_id, name, label, author=_author(), reason=reason
        ),
    )
    typer.echo(f"{name}@{label}: experiment ended")


@experiment_app.command("status")
def experiment_status(
    name: str, label: Label = "production", tenant: Tenant = "default", as_json: AsJson = False
) -> None:
    """Per variant: requests, errors, latency, tokens, feedback, significance."""
    found = run(tenant, lambda registry, tenant_id: registry.status(tenant_id, name, label))
    if as_json:
        _echo_json(found)
    else:
        show_status(found)


@canary_app.command("start")
def canary_start(
    name: str,
    version: int,
    percent: Annotated[int, typer.Option("--percent", help="The canary's share, 1-99.")] = 5,
    label: Label = "production",
    unit: Unit = "user",
    tenant: Tenant = "default",
) -> None:
    """Send PERCENT of the label's units to VERSION."""
    info = run(
        tenant,
        lambda registry, tenant_id: registry.start_canary(
            tenant_id, name, version, percent, label=label, unit=unit, author=_author()
        ),
    )
    typer.echo(f"canary {name}@{version} on {label}: {_split(info)} per {info['unit']}")


@canary_app.command("status")
def canary_status(
    name: str, label: Label = "production", tenant: Tenant = "default", as_json: AsJson = False
) -> None:
    """Canary against baseline: requests, errors, latency, tokens, feedback, significance, pauses."""
    experiment_status(name, label, tenant, as_json)  # a canary is an experiment: the same report


@canary_app.command("promote")
def canary_promote(
    name: str,
    label: Label = "production",
    force: Annotated[bool, typer.Option("--force", help="Override a refusing promotion gate.")] = False,
    reason: Reason = "",
    tenant: Tenant = "default",
) -> None:
    """The canary's version takes the whole label."""
    move = run(
        tenant,
        lambda registry, tenant_id: registry.promote_canary(
            tenant_id, name, label, _author(), reason, force=force
        ),
    )
    _echo_move(move)


@canary_app.command("abort")
def canary_abort(
    name: str, label: Label = "production", reason: Reason = "", tenant: Tenant = "default"
) -> None:
    """Stop the canary; the label serves its own version to everyone."""
    run(tenant, lambda registry, tenant_id: registry.abort_canary(tenant_id, name, label, _author(), reason))
    typer.echo(f"{name}@{label}: canary aborted")


def _split(info: dict[str, Any]) -> str:
    return ", ".join(f"v{version} {weight}%" for version, weight in info["weights"].items())
