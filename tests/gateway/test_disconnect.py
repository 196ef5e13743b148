"""A client that goes away mid-stream stops the generation upstream within a second."""

from __future__ import annotations

import time

import openai

from keel.testing import FakeUpstream, Reply


def test_client_disconnect_cancels_the_upstream_stream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    words = [f" w{i}" for i in range(200)]
    fake.enqueue(Reply(text="".join(words), chunks=words, chunk_delay=0.05))
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "talk"}], stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].delta.content == " w0"
    closed_at = time.monotonic()
    stream.close()
    assert fake.wait_for_cancelled(1, timeout=1.0), "upstream stream still running 1 s after the client left"
    assert time.monotonic() - closed_at < 1.0
