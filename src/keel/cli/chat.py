"""`keel chat`: a terminal chat against a running Keel, streaming tokens as they arrive.

The conversation lives on the server (a conversation id per session), so each turn sends only the new
message. Talks plain HTTP + SSE over aiohttp: the `openai` SDK is a test dependency, not a runtime one.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Annotated

import aiohttp
import orjson
import typer

from keel.settings import Settings


def chat(
    base_url: Annotated[
        str | None, typer.Option(help="Keel's API base, e.g. http://127.0.0.1:8000/v1.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default: DATA_DIR/admin.key).")] = None,
    model: Annotated[str, typer.Option(help="Model alias.")] = "local",
    conversation: Annotated[str | None, typer.Option(help="Continue this conversation id.")] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt for every turn.")] = None,
) -> None:
    """Chat in the terminal; an empty line or Ctrl-D ends it."""
    settings = Settings()
    base = (base_url or f"http://{settings.host}:{settings.port}/v1").rstrip("/")
    key = api_key or _read_admin_key(settings)
    conversation_id = conversation or f"cli-{uuid.uuid4().hex[:12]}"
    typer.echo(f"conversation {conversation_id} with {model} at {base} (empty line to quit)", err=True)
    asyncio.run(_loop(base, key, model, conversation_id, system))


def _read_admin_key(settings: Settings) -> str:
    path = settings.data_dir / "admin.key"
    try:
        return path.read_text().strip()
    except OSError:
        typer.echo(f"no --api-key given and {path} is unreadable", err=True)
        raise typer.Exit(2) from None


async def _loop(base: str, key: str, model: str, conversation_id: str, system: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}", "X-Keel-Conversation-Id": conversation_id}
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": line}
            ]
            if not await _turn(session, base, model, messages):
                raise typer.Exit(1)


async def _turn(
    session: aiohttp.ClientSession, base: str, model: str, messages: list[dict[str, str]]
) -> bool:
    body = {"model": model, "messages": messages, "stream": True}
    async with session.post(f"{base}/chat/completions", json=body) as response:
        if response.status != 200:
            payload = await response.read()
            try:
                message = orjson.loads(payload)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = payload[:300].decode(errors="replace")
            typer.echo(f"error {response.status}: {message}", err=True)
            return False
        sys.stdout.write("keel> ")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                typer.echo(f"\nerror: {chunk['error']['message']}", err=True)
                return False
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
        sys.stdout.write("\n")
    return True
