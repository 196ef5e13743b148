"""The `keel` command."""

from keel.cli.main import app, main

__all__ = ["app", "main"]
