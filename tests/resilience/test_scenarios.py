"""The fault-injection scenario matrix of docs/resilience.md: a real Keel in front of real FakeUpstreams,
through the official openai SDK, each scenario streaming and not."""

from __future__ import annotations

import logging
import time
import uuid

import httpx
import openai
import pytest

from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer

from ._support import ask

pytestmark = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])


def test_01_rate_limited_with_retry_after_waits_then_succeeds(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.enqueue(Reply(status=429, headers={"Retry-After": "1"}), Reply(text="after the pause"))
    answer = ask(client, "patient", stream=stream)
    assert answer.status == 200 and answer.text == "after the pause"
    assert answer.model == "patient" and answer.attempts == 2 and not answer.fell_back
    assert answer.elapsed >= 1.0  # Retry-After honoured
    assert len(fake.requests) == 2 and not backup.requests


def test_02_two_503s_then_success_on_the_third_attempt(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.enqueue(Reply(status=503), Reply(status=503), Reply(text="third time lucky"))
    answer = ask(client, "primary", stream=stream)
    assert (answer.status, answer.text, answer.model, answer.attempts) == (
        200,
        "third time lucky",
        "primary",
        3,
    )
    assert len(fake.requests) == 3 and not backup.requests


def test_02b_anthropic_529_overloaded_is_retried(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.enqueue(Reply(status=529), Reply(text="Claude is back"))
    answer = ask(client, "claude", stream=stream)
    assert (answer.status, answer.text, answer.model, answer.attempts) == (200, "Claude is back", "claude", 2)
    assert [r.path for r in fake.requests] == ["/v1/messages"] * 2 and not backup.requests


def test_03_primary_always_500_the_fallback_answers(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.default_reply = Reply(status=500)
    backup.default_reply = Reply(text="backup here")
    answer = ask(client, "primary", stream=stream)
    assert (answer.status, answer.text, answer.model) == (200, "backup here", "backup")
    assert answer.headers["x-keel-model"] == "backup" and answer.fell_back
    assert answer.attempts == 4  # three on the primary, one on the fallback
    assert len(fake.requests) == 3 and len(backup.requests) == 1
    assert backup.requests[0].body["model"] == "backup-gpt"


def test_04_primary_never_answers_first_token_timeout_then_fallback(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.default_reply = Reply(hang=True)
    answer = ask(client, "primary", stream=stream, headers={"X-Keel-Timeout": "3"})
    assert (answer.status, answer.model) == (200, "backup")
    assert 1.5 <= answer.elapsed < 3  # three 0.5 s first-token timeouts, then the fallback: in the deadline
    assert fake.wait_until_idle(1.0), "the abandoned attempts are still connected upstream"


def test_05_connection_refused_falls_back_at_once(
    client: openai.OpenAI, backup: FakeUpstream, stream: bool
) -> None:
    answer = ask(client, "refused", stream=stream)
    assert (answer.status, answer.model, answer.attempts) == (200, "backup", 2)
    assert answer.elapsed < 0.5


def test_06_upstream_400_goes_back_to_the_client_once(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.default_reply = Reply(status=400, error_message="'temperature' is out of range")
    answer = ask(client, "primary", stream=stream)
    assert answer.status == 400 and "temperature" in answer.error
    assert len(fake.requests) == 1 and not backup.requests


def test_07_upstream_401_falls_back_and_logs_the_misconfigured_deployment(
    client: openai.OpenAI,
    fake: FakeUpstream,
    stream: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.default_reply = Reply(status=401, error_message="Incorrect API key provided")
    with caplog.at_level(logging.ERROR, logger="keel"):
        answer = ask(client, "primary", stream=stream)
    assert (answer.status, answer.model, answer.attempts) == (200, "backup", 2)
    assert len(fake.requests) == 1  # not retried: the key will not get better
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "misconfigured" in r.getMessage()]
    assert errors and "'primary'" in errors[0].getMessage() and "401" in errors[0].getMessage()


def test_08_stream_cut_after_three_chunks_ends_in_an_error_and_is_not_recorded(
    client: openai.OpenAI,
    matrix: KeelServer,
    fake: FakeUpstream,
    backup: FakeUpstream,
    stream: bool,
) -> None:
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    words = ["one", " two", " three", " four"]
    fake.enqueue(Reply(text="".join(words), chunks=words, cut_after=3, chunk_delay=0.01))
    answer = ask(client, "primary", stream=stream, extra_body={"conversation_id": conversation})
    if stream:  # the status went out with the first chunk: the error comes in-band, after the partial text
        assert answer.status == 200 and answer.text == "one two" and answer.error
    else:
        assert answer.status == 502 and answer.error
    assert len(fake.requests) == 1 and not backup.requests  # no retry once content was out
    # A later successful turn is stored; the failed one never was.
    fake.enqueue(Reply(text="fine now"))
    assert ask(client, "primary", stream=False, extra_body={"conversation_id": conversation}).status == 200
    key = client.api_key
    deadline = time.monotonic() + 5
    while True:
        turns = httpx.get(
            f"{matrix.base_url}/conversations/{conversation}", headers={"Authorization": f"Bearer {key}"}
        ).json()["messages"]
        if len(turns) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert turns == [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "fine now"},
    ]


def test_09_stream_stalls_before_the_first_token_fallback_answers(
    client: openai.OpenAI, fake: FakeUpstream, stream: bool
) -> None:
    fake.default_reply = Reply(stall_after=1)  # the opening chunk (a role, no content), then silence
    answer = ask(client, "primary", stream=stream)
    assert (answer.status, answer.model, answer.attempts) == (200, "backup", 4)
    assert fake.wait_until_idle(1.0)


def test_09b_stream_stalls_after_the_first_token_ends_with_an_error(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    words = ["one", " two", " three", " four"]
    fake.enqueue(Reply(text="".join(words), chunks=words, stall_after=3))  # opening, "one", " two"
    answer = ask(client, "primary", stream=stream)
    if stream:
        assert answer.status == 200 and answer.text == "one two" and "silent" in answer.error
    else:
        assert answer.status == 504
    assert 0.5 <= answer.elapsed < 1.0  # the 0.5 s idle limit, not the 10 s deadline
    assert len(fake.requests) == 1 and not backup.requests
    assert fake.wait_until_idle(1.0)


def test_10_retry_after_beyond_the_deadline_falls_back_without_waiting(
    client: openai.OpenAI, fake: FakeUpstream, stream: bool
) -> None:
    fake.default_reply = Reply(status=429, headers={"Retry-After": "120"})
    answer = ask(client, "patient", stream=stream, headers={"X-Keel-Timeout": "10"})
    assert (answer.status, answer.model, answer.attempts) == (200, "backup", 2)
    assert answer.elapsed < 1.0
    assert len(fake.requests) == 1


def test_13_everything_fails_502_listing_the_attempts(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    leak = "upstream body with sk-upstream-secret-0123456789 inside"
    fake.default_reply = Reply(status=500, error_message=leak)
    backup.default_reply = Reply(status=502, error_message=leak)
    answer = ask(client, "primary", stream=stream, headers={"X-Keel-Timeout": "5"})
    assert answer.status == 502 and answer.elapsed < 5
    message = answer.error
    assert "6 attempts" in message
    assert message.count("primary via primary: server_error 500") == 3
    assert message.count("backup via backup: server_error 502") == 3
    assert "secret" not in message and "upstream body" not in message


def test_14_context_length_error_falls_back_to_the_larger_context_model(
    client: openai.OpenAI, fake: FakeUpstream, backup: FakeUpstream, stream: bool
) -> None:
    fake.default_reply = Reply(
        status=400,
        error_message="This model's maximum context length is 4096 tokens. You requested 9000 tokens.",
    )
    backup.default_reply = Reply(text="plenty of room")
    answer = ask(client, "short", stream=stream)
    assert (answer.status, answer.model, answer.text) == (200, "long", "plenty of room")
    assert len(fake.requests) == 1  # no retry
    # "backup" has no window configured and "mid" a smaller one: both passed over.
    assert [r.body["model"] for r in backup.requests] == ["long-gpt"]


@pytest.mark.parametrize(
    ("alias", "malformed"), [("primary", "json"), ("primary", "sse"), ("claude", "json"), ("claude", "sse")]
)
def test_15_malformed_json_or_sse_is_an_upstream_error_and_falls_back(
    client: openai.OpenAI,
    fake: FakeUpstream,
    stream: bool,
    alias: str,
    malformed: str,
) -> None:
    fake.default_reply = Reply(malformed=malformed)  # type: ignore[arg-type]
    answer = ask(client, alias, stream=stream)
    assert (answer.status, answer.model, answer.attempts) == (200, "backup", 2)
    assert len(fake.requests) == 1  # a broken answer is not retried on the same upstream
