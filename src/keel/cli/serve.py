"""`keel serve`."""

from __future__ import annotations

import gc
from typing import Annotated

import typer
import uvicorn

from keel.app import create_app
from keel.settings import Settings
from keel.telemetry import configure_logging

# Young-generation collections every 700 allocations (the default) cost ~10 % of a request's CPU at 32
# concurrent requests, and full collections over every imported module's objects stalled requests for
# tens of milliseconds (p99). Freeze what start-up built, and collect the young generation less often.
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    gc.collect()
    gc.freeze()  # start-up's objects (modules, classes, schemas) are never scanned again
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


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
        f"  keel chat --base-url {base}   # reads the admin key from {key_file}\n",
        err=True,
    )
    app = create_app(settings)
    tune_gc()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_drain_seconds),
        # Past this many open connections plus running requests, a new request is a 503 at once, before
        # its body is read: a flood of slow or large requests cannot exhaust memory or file descriptors.
        limit_concurrency=settings.limit_concurrency,
    )
