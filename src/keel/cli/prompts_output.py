"""How `keel prompts` prints versions, histories and experiment status for people (`--json` for scripts)."""

from __future__ import annotations

from typing import Any

import typer
import yaml


def show_version(version: dict[str, Any]) -> None:
    labels = ", ".join(version["labels"]) or "none"
    typer.echo(f"{version['name']}@{version['version']}  labels: {labels}")
    typer.echo(f"author: {version['author'] or '-'}  created: {version['created_at']}")
    typer.echo(f"hash: {version['content_hash']}")
    if version["description"]:
        typer.echo(f"description: {version['description']}")
    if version["tags"]:
        typer.echo(f"tags: {', '.join(version['tags'])}")
    if version["model"]:
        typer.echo(f"model: {_inline(version['model'])}")
    for name, declared in version["variables"].items():
        need = "required" if declared["required"] else f"default {declared['default']!r}"
        typer.echo(f"variable {name}: {declared['type']}, {need}")
    typer.echo("")
    if version["template"] is not None:
        typer.echo(version["template"])
    for message in version["messages"] or []:
        typer.echo(f"[{message['role']}]")
        typer.echo(message["content"])


def show_history(history: dict[str, Any]) -> None:
    labels = " ".join(f"{label}={version}" for label, version in sorted(history["labels"].items()))
    typer.echo(f"{history['name']}  {labels}")
    typer.echo("versions:")
    for version in history["versions"]:
        note = f"  {version['description']}" if version["description"] else ""
        typer.echo(f"  {version['version']}\t{version['created_at']}\t{version['author'] or '-'}{note}")
    typer.echo("label moves:")
    for move in history["moves"]:
        source = move["from"] if move["from"] is not None else "(new)"
        target = move["to"] if move["to"] is not None else "(removed)"
        forced = " FORCED" if move["forced"] else ""
        reason = f"  {move['reason']}" if move["reason"] else ""
        typer.echo(
            f"  {move['created_at']}\t{move['label']}: {source} -> {target}\t{move['author'] or '-'}"
            f"{forced}{reason}"
        )


def show_status(status: dict[str, Any]) -> None:
    experiment = status["experiment"]
    weights = ", ".join(f"v{version} {weight}%" for version, weight in experiment["weights"].items())
    typer.echo(
        f"{experiment['kind']} {experiment['id']} on {experiment['name']}@{experiment['label']}: "
        f"{experiment['status']}, {weights}, per {experiment['unit']}"
    )
    header = (
        "variant",
        "version",
        "requests",
        "errors",
        "p50 ms",
        "p99 ms",
        "out tok",
        "feedback",
        "score",
        "vs base",
    )
    rows = [header]
    for variant in status["variants"]:
        rows.append(
            (
                variant["variant"],
                str(variant["version"]),
                str(variant["requests"]),
                f"{variant['error_rate']:.1%}",
                _number(variant["p50_ms"]),
                _number(variant["p99_ms"]),
                _number(variant["mean_output_tokens"]),
                str(variant["feedback"]),
                _number(variant["feedback_score"]),
                _significance(variant["tests"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for event in status["events"]:
        details = f"  {_inline(event['details'])}" if event["details"] else ""
        typer.echo(f"{event['created_at']}  {event['event']}  {event['author'] or '-'}{details}")


def _significance(tests: dict[str, Any]) -> str:
    if not tests:
        return "-"
    marks = []
    for metric, short in (("error_rate", "errors"), ("negative_rate", "negative")):
        p = tests.get(f"{metric}_p")
        if p is not None:
            star = " significant" if tests[f"{metric}_significant"] else ""
            marks.append(f"{short} p={p:.3g}{star}")
    return "; ".join(marks) or "-"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _inline(data: Any) -> str:
    return yaml.safe_dump(data, default_flow_style=True, sort_keys=True, width=10_000).strip()
