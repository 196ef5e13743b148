"""`keel serve`."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

from keel.app import create_app
from keel.settings import Settings
from keel.telemetry import configure_logging


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: KEEL_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: KEEL_PORT or 8000).")] = None,
) -> None:
    """Serve Keel's OpenAI-compatible API."""
    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level, settings.log_format)
    key_file = settings.data_dir / "admin.key"
    base = f"http://{settings.host}:{settings.port}/v1"
    typer.echo(
        "Try it (the admin key is in " + str(key_file) + "):\n\n"
        f'  curl {base}/chat/completions -H "Authorization: Bearer $(cat {key_file})" \\\n'
        "    -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "local", "stream": true, "messages": [{"role": "user", "content": "Hi!"}]}\'\n\n'
        f"  keel chat --base-url {base} --api-key $(cat {key_file})\n",
        err=True,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_drain_seconds),
    )
