"""The local model runs in a supervised worker process: its crash ends one stream, not the gateway."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from keel.llm.local import LocalChatModel
from keel.llm.local_process import describe_exit
from keel.testing.server import KeelServer

pytestmark = pytest.mark.local_model

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
HELLO = [{"role": "user", "content": "Say hello."}]

SDK = Callable[[KeelServer, str], openai.OpenAI]


def local_model(server: KeelServer) -> LocalChatModel:
    model = server.components.models.providers("local")[0]
    assert isinstance(model, LocalChatModel)
    return model


def answered_after_restart(sdk: openai.OpenAI, timeout: float = 30.0) -> tuple[str, float]:
    """The first local answer once the worker is back, and how long that took."""
    began = time.monotonic()
    refusals: list[openai.APIStatusError] = []
    while time.monotonic() - began < timeout:
        try:
            completion = sdk.chat.completions.create(model="local", messages=HELLO, max_tokens=4)
        except openai.APIStatusError as exc:
            refusals.append(exc)
            time.sleep(0.1)
            continue
        assert all(refusal.status_code == 503 for refusal in refusals), refusals
        return completion.choices[0].message.content or "", time.monotonic() - began
    pytest.fail(f"no local answer within {timeout} s: {refusals[-1:]}")


def test_a_killed_worker_ends_its_stream_and_is_restarted(
    keel: KeelServer, tenant: Any, make_client: SDK
) -> None:
    sdk = make_client(keel, tenant.chat_key)
    model = local_model(keel)
    pid, starts = model.worker_pid, model.worker_starts
    assert pid is not None

    stream = sdk.chat.completions.create(model="local", messages=STORY, max_tokens=1000, stream=True)
    received = 0

    def read_and_kill() -> None:
        nonlocal received
        for _ in stream:
            received += 1
            if received == 3:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(openai.APIError):
        read_and_kill()
    assert received >= 3

    # During the outage (and after it) another alias answers as if nothing happened.
    other = sdk.chat.completions.create(model="fake", messages=HELLO)
    assert other.choices[0].message.content

    text, waited = answered_after_restart(sdk)
    assert text
    assert waited < 15
    assert model.worker_starts == starts + 1
    assert model.worker_pid not in (None, pid)


def test_the_worker_dies_with_the_gateway(tmp_path: Path, database_url: str) -> None:
    from keel.testing.process import KeelProcess

    keel = KeelProcess(tmp_path, {"KEEL_DATABASE_URL": database_url}).start()
    try:
        assert keel.pid is not None
        children = children_of(keel.pid)  # the model worker, and the audit writer's redaction process
        assert any(b"keel.llm.local_server" in cmdline(pid) for pid in children), children
    finally:
        keel.stop()  # SIGKILL: the gateway gets no chance to stop its children
    deadline = time.monotonic() + 10
    while alive := [pid for pid in children if not gone(pid)]:
        assert time.monotonic() < deadline, f"outlived their gateway: {[cmdline(p) for p in alive]}"
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_model_that_cannot_load_is_said_once_and_the_rest_serves(
    tmp_path: Path,
    start_keel: Callable[..., KeelServer],
    tenant: Any,
    make_client: SDK,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF this is not a model" * 100)
    with caplog.at_level(logging.ERROR, logger="keel.llm.local_process"):
        server = start_keel(local={"model_path": broken})
    lines = [r.getMessage() for r in caplog.records if r.name == "keel.llm.local_process"]
    assert len(lines) == 1, lines
    assert "local model 'local' is down: cannot load" in lines[0]
    assert str(broken) in lines[0]
    assert local_model(server).worker_starts == 1  # not restarted: it would fail the same way

    ready = httpx.get(f"{server.url}/readyz", headers=server.admin_headers())
    assert ready.status_code == 503
    check = ready.json()["checks"]["model:local"]
    assert check["ok"] is False and "cannot load" in check["detail"]

    sdk = make_client(server, tenant.chat_key)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="local", messages=HELLO)
    assert caught.value.status_code == 503
    assert sdk.chat.completions.create(model="fake", messages=HELLO).choices[0].message.content


def test_a_crash_is_explained_with_its_fix() -> None:
    from collections import deque

    said = describe_exit(-signal.SIGILL, False, deque(["ggml: loading model"]))
    assert "SIGILL while loading" in said
    assert "built for another CPU" in said and "make clean run" in said
    assert said.endswith("its last words: ggml: loading model")
    assert describe_exit(-signal.SIGKILL, True, deque()) == (
        "the worker process was killed by SIGKILL while answering"
    )
    assert describe_exit(1, True, deque()) == "the worker process exited with status 1 while answering"
