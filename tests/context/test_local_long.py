"""A long conversation with the real local model: its length never makes a turn fail."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest

from keel.settings import ContextSettings, LocalModelSettings
from keel.testing.server import KeelServer

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(900)]  # ~2-5 min on 2 cores

N_CTX = 512  # a small window (the default is 2,048), so 300 turns overflow it many times over
MAX_TOKENS = 2


def test_300_turns_with_the_local_model_never_fail_for_their_length(
    start_keel: Callable[..., KeelServer],
    make_tenant: Callable[..., Any],
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    keel = start_keel(local=LocalModelSettings(n_ctx=N_CTX), context=ContextSettings(strategy="trim"))
    client = make_client(keel, make_tenant().chat_key)
    conversation = f"long-local-{uuid.uuid4().hex[:8]}"
    budget = N_CTX - MAX_TOKENS - ContextSettings().margin_tokens
    dropped: list[int] = []
    started = time.monotonic()
    for turn in range(300):
        raw = client.chat.completions.with_raw_response.create(
            model="local",
            messages=[{"role": "user", "content": f"Turn {turn}: please remember the number {turn * 7}."}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"conversation_id": conversation},
        )
        completion = raw.parse()
        assert completion.choices[0].finish_reason in ("stop", "length")
        # the model's own count of what it got, within the budget the local tokenizer fitted
        assert completion.usage is not None and completion.usage.prompt_tokens <= budget
        assert int(raw.headers["x-keel-context-tokens"]) <= budget
        dropped.append(int(raw.headers["x-keel-context-dropped"]))
    assert dropped[0] == 0 and dropped[-1] > 250  # most turns no longer fit; every one was answered
    assert time.monotonic() - started < 600
