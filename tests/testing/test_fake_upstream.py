"""FakeUpstream speaks the wire formats exactly as the official openai and anthropic SDKs expect them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from keel.testing import FakeUpstream, Reply

HELLO = [{"role": "user", "content": "Hi"}]
WEATHER = {"id": "call_w", "name": "weather", "arguments": {"city": "Paris", "days": 3}}


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def oai(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.openai_base_url, api_key="sk-test", max_retries=0, timeout=10) as client:
        yield client


@pytest.fixture
def claude(fake: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake.base_url, api_key="sk-ant", max_retries=0, timeout=10) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- OpenAI wire format, through the openai SDK


def test_openai_sdk_completion(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.enqueue(Reply(text="Bonjour.", input_tokens=5, output_tokens=2))

    completion = oai.chat.completions.create(model="fake-gpt", messages=HELLO)

    assert completion.model == "fake-gpt"
    assert completion.choices[0].message.content == "Bonjour."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 2)


def test_openai_sdk_stream_with_usage(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.enqueue(Reply(text="One two three.", output_tokens=3))

    chunks = list(
        oai.chat.completions.create(
            model="fake-gpt",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "One two three."
    assert [c.choices[0].delta.content for c in chunks[1:4]] == ["One ", "two ", "three."]  # word pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_stream_without_include_usage_has_no_usage(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="fake-gpt", messages=HELLO, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from FakeUpstream."


def test_openai_sdk_tool_calls(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.enqueue(Reply(text="", tool_calls=[WEATHER]), Reply(text="", tool_calls=[WEATHER]))

    completion = oai.chat.completions.create(model="fake-gpt", messages=HELLO)
    chunks = list(oai.chat.completions.create(model="fake-gpt", messages=HELLO, stream=True))

    (call,) = completion.choices[0].message.tool_calls or []
    assert call.id == "call_w"
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert completion.choices[0].finish_reason == "tool_calls"
    pieces = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id == "call_w"
    assert len(pieces) > 2
    arguments = "".join(piece.function.arguments or "" for piece in pieces if piece.function)
    assert json.loads(arguments) == {"city": "Paris", "days": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.asyncio
async def test_async_openai_sdk_stream(fake: FakeUpstream) -> None:
    fake.enqueue(Reply(text="async works"))
    async with openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0) as client:
        stream = await client.chat.completions.create(model="fake-gpt", messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "async works"


def test_openai_sdk_sees_status_errors_and_retry_after(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.enqueue(Reply(status=429, error_message="too many", headers={"Retry-After": "3"}))
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model="fake-gpt", messages=HELLO)
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.body == {
        "message": "too many",
        "type": "rate_limit_error",
        "param": None,
        "code": None,
    }


def test_openai_sdk_sees_an_error_inside_the_stream(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.enqueue(Reply(text="partial", stream_error="fell over"))
    stream = oai.chat.completions.create(model="fake-gpt", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError, match="fell over"):
        list(stream)


def test_delay_makes_a_client_time_out(fake: FakeUpstream) -> None:
    fake.enqueue(Reply(delay=2.0))
    with (
        openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0, timeout=0.2) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        client.chat.completions.create(model="fake-gpt", messages=HELLO)


# -- Anthropic wire format, through the anthropic SDK


def test_anthropic_sdk_message(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    fake.enqueue(Reply(text="Salut.", input_tokens=4, output_tokens=2))

    message = claude.messages.create(model="fake-claude", max_tokens=100, messages=HELLO)

    assert message.model == "fake-claude"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Salut."
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 2)


def test_anthropic_sdk_stream_helper(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    fake.enqueue(Reply(text="Looking it up.", tool_calls=[WEATHER], output_tokens=9))

    with claude.messages.stream(model="fake-claude", max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()

    assert text == "Looking it up."
    assert [block.type for block in message.content] == ["text", "tool_use"]
    tool = message.content[1]
    assert (tool.id, tool.name, tool.input) == ("call_w", "weather", {"city": "Paris", "days": 3})
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == 9


def test_anthropic_raw_event_sequence(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    fake.enqueue(Reply(text="a b", finish_reason="stop_sequence"))

    events = list(claude.messages.create(model="fake-claude", max_tokens=10, messages=HELLO, stream=True))

    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK swallows the ping that follows the first content_block_start
    assert events[-2].delta.stop_reason == "stop_sequence"


def test_anthropic_sdk_sees_error_bodies(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    fake.enqueue(Reply(status=529), Reply(status=400, error_message="max_tokens: too big"))
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        claude.messages.create(model="fake-claude", max_tokens=10, messages=HELLO)
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="fake-claude", max_tokens=10, messages=HELLO)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "FakeUpstream scripted 529 Overloaded"},
    }
    # What FakeUpstream sent, as the SDK parsed it (the SDK's own message wording changes between releases).
    assert bad.value.status_code == 400
    assert bad.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: too big"},
    }


def test_anthropic_sdk_sees_an_error_event(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    fake.enqueue(Reply(text="partial", stream_error="Overloaded", error_type="overloaded_error"))
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        list(claude.messages.create(model="fake-claude", max_tokens=10, messages=HELLO, stream=True))


def test_models_list_for_both_sdks(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    assert [model.id for model in oai.models.list()] == ["fake-gpt", "fake-claude"]
    assert [model.id for model in claude.models.list()] == ["fake-gpt", "fake-claude"]


# -- keys, scripting, recording


@pytest.fixture
def guarded() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="right") as upstream:
        yield upstream


def test_a_wrong_key_gets_401_in_each_format(guarded: FakeUpstream) -> None:
    with (
        openai.OpenAI(base_url=guarded.openai_base_url, api_key="wrong", max_retries=0) as client,
        anthropic.Anthropic(base_url=guarded.base_url, api_key="wrong", max_retries=0) as claude,
    ):
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="m", messages=HELLO)
        with pytest.raises(anthropic.AuthenticationError) as caught:
            claude.messages.create(model="m", max_tokens=1, messages=HELLO)
    assert refused.value.code is None
    assert refused.value.type == "authentication_error"
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid api key"},
    }


def test_the_right_key_passes_as_bearer_or_x_api_key(guarded: FakeUpstream) -> None:
    with (
        openai.OpenAI(base_url=guarded.openai_base_url, api_key="right", max_retries=0) as client,
        anthropic.Anthropic(base_url=guarded.base_url, api_key="right", max_retries=0) as claude,
    ):
        assert client.chat.completions.create(model="m", messages=HELLO).choices
        assert claude.messages.create(model="m", max_tokens=1, messages=HELLO).content
    body = json.dumps({"model": "m", "max_tokens": 1, "messages": HELLO}).encode()
    request = urllib.request.Request(
        f"{guarded.base_url}/v1/messages", data=body, headers={"x-api-key": "right"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert json.load(answer)["type"] == "message"


def test_replies_are_first_in_first_out_then_the_default(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.enqueue(Reply(text="first"), Reply(text="second"))
    fake.default_reply = Reply(text="default")
    texts = [
        oai.chat.completions.create(model="m", messages=HELLO).choices[0].message.content for _ in range(4)
    ]
    assert texts == ["first", "second", "default", "default"]


def test_requests_are_recorded(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(model="fake-gpt", messages=HELLO, temperature=0.1)
    (recorded,) = fake.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer sk-test"
    assert all(name == name.lower() for name in recorded.headers)
    assert recorded.body == {"model": "fake-gpt", "messages": HELLO, "temperature": 0.1}

    fake.reset()
    assert fake.requests == []


def test_a_body_that_is_not_json_is_a_400(fake: FakeUpstream) -> None:
    request = urllib.request.Request(f"{fake.openai_base_url}/chat/completions", data=b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
    assert json.load(caught.value)["error"]["type"] == "invalid_request_error"


def test_abandoned_streams_are_counted(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.enqueue(Reply(chunks=["tick "] * 100, chunk_delay=0.05))
    assert not fake.wait_for_cancelled(1, timeout=0.05)

    stream = oai.chat.completions.create(model="m", messages=HELLO, stream=True)
    next(iter(stream))
    stream.close()

    assert fake.wait_for_cancelled(1, timeout=1.0)
    assert fake.cancelled_streams == 1
    list(oai.chat.completions.create(model="m", messages=HELLO, stream=True))
    assert fake.cancelled_streams == 1  # a stream read to the end is not abandoned


def test_serves_many_threads_at_once(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    def ask(number: int) -> str:
        return oai.chat.completions.create(model=f"m{number}", messages=HELLO).model

    with ThreadPoolExecutor(max_workers=8) as pool:
        models = list(pool.map(ask, range(32)))

    assert models == [f"m{number}" for number in range(32)]
    assert sorted(request.body["model"] for request in fake.requests) == sorted(models)


def test_given_port_and_stop_frees_it() -> None:
    port = free_port()
    with FakeUpstream(port=port) as fake:
        assert fake.base_url == f"http://127.0.0.1:{port}"
        assert fake.openai_base_url == f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(f"{fake.base_url}/v1/models", timeout=5) as answer:
            assert answer.status == 200
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_runs_as_its_own_process() -> None:
    port = free_port()
    env = os.environ | {"PYTHONWARNINGS": "error"}
    with subprocess.Popen(
        [sys.executable, "-m", "keel.testing.fake_upstream", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        assert process.stdout is not None
        try:
            assert process.stdout.readline().strip() == f"listening on http://127.0.0.1:{port}"
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0) as client:
                reply = client.chat.completions.create(model="m", messages=HELLO)
            assert reply.choices[0].message.content == "Hello from FakeUpstream."
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
        assert process.stderr is not None
        assert process.stderr.read() == ""
