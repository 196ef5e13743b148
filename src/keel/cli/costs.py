"""`keel costs` (reports, tenant prices) and `keel budgets`: the same operations as /v1/usage,
/v1/prices and /v1/budgets, run against the database directly. A running server picks changes up within
`costs.refresh_seconds`."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import typer

from keel.costs import BudgetStore, UsageReports
from keel.costs.reports import GROUPS
from keel.db import Database
from keel.errors import KeelError
from keel.settings import Settings
from keel.tenants import TenantService
from keel.tenants.keys import parse_duration

T = TypeVar("T")

costs_app = typer.Typer(help="Spend reports and tenant prices.", no_args_is_help=True)
prices_app = typer.Typer(
    help="A tenant's own prices per alias (USD per million tokens).", no_args_is_help=True
)
budgets_app = typer.Typer(help="Daily and monthly budgets in USD.", no_args_is_help=True)
costs_app.add_typer(prices_app, name="prices")


def _run(tenant: str, action: Callable[[Any, TenantService, uuid.UUID], Awaitable[T]], store: str) -> T:
    async def go() -> T:
        settings = Settings()
        database = Database(settings)
        try:
            engine = await database.open()
            tenants = TenantService(engine, settings)
            owner = await tenants.get_tenant(tenant)
            target = BudgetStore(engine) if store == "budgets" else UsageReports(engine)
            return await action(target, tenants, owner.id)
        finally:
            await database.close()

    try:
        return asyncio.run(go())
    except KeelError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


@costs_app.command("report")
def report(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    since: Annotated[str, typer.Option(help="How far back, in whole UTC days: 30d, 2w, 24h.")] = "30d",
    by: Annotated[str, typer.Option(help=f"Group by: {', '.join(GROUPS)}.")] = "model",
    format: Annotated[str, typer.Option(help="table, csv or json.")] = "table",
) -> None:
    """Spend of a tenant, from the daily rollups."""
    if format not in ("table", "csv", "json"):
        typer.echo("error: --format must be table, csv or json", err=True)
        raise typer.Exit(2)
    try:
        span = parse_duration(since)
    except ValueError as exc:
        typer.echo(f"error: --since: {exc}", err=True)
        raise typer.Exit(2) from None
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=max(0, span.days - 1) if span.days else 0), today + timedelta(days=1)
    lines = _run(tenant, lambda r, _t, tid: r.report(tid, start, end, by), "reports")
    rows = [line.as_json() for line in lines]
    if format == "json":
        typer.echo(json.dumps({"start": str(start), "end": str(end), "group_by": by, "data": rows}, indent=2))
        return
    columns = ["group", "calls", "input_tokens", "cached_input_tokens", "output_tokens", "cost_usd"]
    if format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(out.getvalue(), nl=False)
        return
    header = [by, "calls", "input", "cached", "output", "cost USD"]
    table = [[str(r[c]) if c != "cost_usd" else f"{r[c]:.6f}" for c in columns] for r in rows]
    total = sum(line.cost_micros for line in lines) / 1_000_000
    widths = [max([len(h)] + [len(row[i]) for row in table]) for i, h in enumerate(header)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    typer.echo(f"total ${total:.6f} for {start} to {today} (UTC)")


@prices_app.command("set")
def prices_set(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    alias: Annotated[str, typer.Option(help="Model alias.")],
    input: Annotated[float, typer.Option(help="USD per million input tokens.")],
    output: Annotated[float, typer.Option(help="USD per million output tokens.")],
    cached_input: Annotated[float | None, typer.Option(help="USD per million cached input tokens.")] = None,
) -> None:
    """Set this tenant's price for an alias (overrides keel.toml and genai-prices)."""
    _run(tenant, lambda s, _t, tid: s.set_price(tid, alias, input, output, cached_input), "budgets")
    typer.echo(
        f"price of {alias} for {tenant}: input {input}, cached {cached_input}, output {output} per MTok"
    )


@prices_app.command("delete")
def prices_delete(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    alias: Annotated[str, typer.Option(help="Model alias.")],
) -> None:
    """Remove this tenant's price for an alias."""
    _run(tenant, lambda s, _t, tid: s.delete_price(tid, alias), "budgets")
    typer.echo(f"removed the price of {alias} for {tenant}")


@budgets_app.command("set")
def budgets_set(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    monthly: Annotated[float | None, typer.Option(help="USD per UTC month.")] = None,
    daily: Annotated[float | None, typer.Option(help="USD per UTC day.")] = None,
    soft: Annotated[str, typer.Option(help="Soft thresholds in percent, e.g. 50,80.")] = "",
    key: Annotated[
        str | None, typer.Option(help="Only this key (its id); default: the whole tenant.")
    ] = None,
    per_user: Annotated[bool, typer.Option(help="The limit applies to each end user (`user`).")] = False,
) -> None:
    """Set daily and/or monthly budgets (a new limit replaces the old one of the same scope)."""
    if monthly is None and daily is None:
        typer.echo("error: give --monthly, --daily or both", err=True)
        raise typer.Exit(2)
    try:
        percents = [int(p) for p in soft.split(",") if p.strip()]
        key_id = uuid.UUID(key) if key else None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    async def go(store: BudgetStore, _tenants: TenantService, tenant_id: uuid.UUID) -> list[str]:
        done = []
        for period, limit in (("month", monthly), ("day", daily)):
            if limit is not None:
                budget = await store.set_budget(
                    tenant_id, period, limit, key_id=key_id, per_end_user=per_user, soft_percents=percents
                )
                done.append(f"{budget.describe()} ${limit:.2f} (id {budget.id})")
        return done

    for line in _run(tenant, go, "budgets"):
        typer.echo(f"set {line}")


@budgets_app.command("list")
def budgets_list(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """List a tenant's budgets."""
    for budget in _run(tenant, lambda s, _t, tid: s.list_budgets(tid), "budgets"):
        soft = ",".join(str(p) for p in budget.soft_percents) or "-"
        typer.echo(f"{budget.id}\t{budget.describe()}\t${budget.limit_micros / 1e6:.2f}\tsoft {soft}")


@budgets_app.command("delete")
def budgets_delete(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    budget_id: Annotated[str, typer.Argument(help="The budget's id (keel budgets list).")],
) -> None:
    """Delete a budget."""
    _run(tenant, lambda s, _t, tid: s.delete_budget(tid, uuid.UUID(budget_id)), "budgets")
    typer.echo(f"deleted budget {budget_id}")
