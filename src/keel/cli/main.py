"""`keel`: serve, db, tenants, keys, chat. Every data command works from the same settings as `serve`."""

from __future__ import annotations

import typer

from keel.cli import audit, chat, conversations, costs, data, prompts, serve

app = typer.Typer(
    name="keel",
    help="Keel: an OpenAI-compatible backend for AI chat products.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("serve")(serve.serve)
app.command("chat")(chat.chat)
app.add_typer(data.db_app, name="db")
app.add_typer(data.tenants_app, name="tenants")
app.add_typer(data.keys_app, name="keys")
app.add_typer(audit.audit_app, name="audit")
app.command("replay")(audit.replay)
app.add_typer(prompts.prompts_app, name="prompts")
app.add_typer(conversations.conversations_app, name="conversations")
app.add_typer(costs.costs_app, name="costs")
app.add_typer(costs.budgets_app, name="budgets")


def main() -> None:
    app()
