"""The context window: what of a conversation goes upstream, within the model's real token budget.

Layout, in order: the prompt version's messages and the client's system/developer messages, the rolling
summary (if any), retrieved context, then the newest whole turn groups that fit. A turn group is a user
message with every assistant, tool-call and tool-result message up to the next user message: it is sent
whole or not at all, so no tool result is ever sent without the call it answers. The newest group (the
turn being asked) must fit; if it does not, its tool results are shortened first, then the request is a
400 `context_length_exceeded` that says by how many tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from keel.errors import InvalidRequestError

Message = dict[str, Any]

# Context windows of well-known upstream models, by model-name prefix (longest first wins); an alias's
# `context_window` in keel.toml overrides these. Unknown models get no window: nothing is trimmed for them
# and the upstream's own context-length error drives the context-window fallback.
KNOWN_WINDOWS: tuple[tuple[str, int], ...] = (
    ("gpt-4.1", 1_047_576),
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 16_385),
    ("gpt-5", 400_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("claude", 200_000),
)

TRUNCATED = "[truncated by Keel: {n} tokens of this tool result did not fit the context window]"


def known_window(model: str) -> int | None:
    best: tuple[int, int] | None = None
    for prefix, window in KNOWN_WINDOWS:
        if model.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), window)
    return best[1] if best is not None else None


class ContextLengthError(InvalidRequestError):
    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(
            f"This turn needs {needed} tokens of context but the model's budget for it is {budget} "
            f"(its context window less the tokens reserved for the answer): {needed - budget} tokens "
            "too many. Shorten the message or lower max_tokens.",
            param="messages",
            code="context_length_exceeded",
        )


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored or new message with its token count (by the alias's counter). id None: not stored yet."""

    message: Message
    tokens: int
    id: int | None = None


@dataclass(slots=True)
class Window:
    """What was decided: the history that goes upstream and why."""

    history: list[Message] = field(default_factory=list)  # the turn groups sent, oldest first
    tokens: int = 0  # the whole prompt, fixed part included
    budget: int = 0
    sent_ids: list[int] = field(default_factory=list)  # stored message ids sent (new turns have none yet)
    dropped_turns: int = 0  # whole turn groups left out
    dropped_from: int | None = None  # the newest stored message id left out
    truncated_tool_results: int = 0

    @property
    def usage(self) -> float:
        return self.tokens / self.budget if self.budget else 0.0


def turn_groups(turns: Sequence[Turn]) -> list[list[Turn]]:
    """Split at each user message; anything before the first user message is a group of its own."""
    groups: list[list[Turn]] = []
    for turn in turns:
        if turn.message.get("role") == "user" or not groups:
            groups.append([turn])
        else:
            groups[-1].append(turn)
    return groups


def fit(
    fixed_tokens: int,
    turns: Sequence[Turn],
    budget: int,
    count: Callable[[Message], int],
) -> Window:
    """The newest whole turn groups of `turns` that fit `budget` after `fixed_tokens` (prompt, system
    messages, summary, retrieved context, reply priming). `count` counts one message (after truncation)."""
    groups = turn_groups(turns)
    window = Window(budget=budget, tokens=fixed_tokens)
    if not groups:
        if fixed_tokens > budget:
            raise ContextLengthError(fixed_tokens, budget)
        return window
    newest = groups.pop()
    newest_tokens = sum(t.tokens for t in newest)
    if fixed_tokens + newest_tokens > budget:
        newest, newest_tokens, window.truncated_tool_results = _shorten_tool_results(
            newest, fixed_tokens + newest_tokens - budget, count
        )
        if fixed_tokens + newest_tokens > budget:
            raise ContextLengthError(fixed_tokens + newest_tokens, budget)
    used = fixed_tokens + newest_tokens
    kept = [newest]
    while groups:
        size = sum(t.tokens for t in groups[-1])
        if used + size > budget:
            break  # older groups stay out too: the history sent is always a contiguous newest part
        used += size
        kept.append(groups.pop())
    window.tokens = used
    window.dropped_turns = len(groups)
    if groups:
        window.dropped_from = max((t.id for g in groups for t in g if t.id is not None), default=None)
    for group in reversed(kept):
        for turn in group:
            window.history.append(turn.message)
            if turn.id is not None:
                window.sent_ids.append(turn.id)
    return window


def _shorten_tool_results(
    group: list[Turn], excess: int, count: Callable[[Message], int]
) -> tuple[list[Turn], int, int]:
    """Cut tool-result contents, largest first, until `excess` tokens are gone; ids are kept."""
    shortened = list(group)
    cut = 0
    order = sorted(
        (i for i, t in enumerate(group) if t.message.get("role") == "tool"),
        key=lambda i: group[i].tokens,
        reverse=True,
    )
    for i in order:
        if excess <= 0:
            break
        turn = shortened[i]
        content = turn.message.get("content")
        if not isinstance(content, str) or not content:
            continue
        keep_tokens = max(0, turn.tokens - excess - 16)  # 16: room for the truncation note
        keep_chars = len(content) * keep_tokens // max(turn.tokens, 1)
        message = dict(turn.message)
        while True:
            message["content"] = content[:keep_chars] + TRUNCATED.format(n=max(turn.tokens - keep_tokens, 1))
            tokens = count(message)
            if tokens - turn.tokens <= -excess or keep_chars == 0:
                break
            keep_chars //= 2
        excess -= turn.tokens - tokens
        shortened[i] = Turn(message, tokens, turn.id)
        cut += 1
    return shortened, sum(t.tokens for t in shortened), cut


class Counter(Protocol):
    """What the window needs of a token counter (keel.llm.tokens): a stable name stored next to each
    count, and the tokens of one message with its chat-template overhead."""

    @property
    def name(self) -> str: ...

    def count_message(self, message: Message) -> int: ...

    def count_messages(self, messages: list[Message]) -> int: ...
