"""The `TokenCounter` protocol, the facts of a chat template's overhead, and what a message holds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

Message = Mapping[str, Any]  # an OpenAI-format chat message


@dataclass(frozen=True)
class Overhead:
    """The tokens a chat template adds around the text of the messages.

    count_messages(ms) = conversation_start[role of ms[0]] + sum(count_message(m)) + reply_priming,
    and count_message(m) = per_message[role] + the tokens of its text (+ per_name when it has a name).
    """

    per_message: Mapping[str, int]  # by role: the template's tokens around one message's text
    per_name: int  # added for a `name` field, besides the name's own tokens
    per_tool_call: int  # added for each tool call, besides its function name and arguments
    reply_priming: int  # at the end: the template opens the assistant's reply
    conversation_start: Mapping[str, int]  # by the first message's role (e.g. a default system prompt)
    image_part: int  # the fixed cost of one image (or other non-text) content part


class TokenCounter(Protocol):
    """Counts what a model alias's upstream will count as prompt tokens for OpenAI-format messages.

    Counts are in the counter's own units, named by `name`, which is stored next to each stored count: a
    count is reused only by a counter of the same name. For an exact counter these are the upstream's
    tokens; an estimating counter (`exact` False) counts o200k tokens, and `upstream_tokens` turns a sum
    of them into the upstream's tokens with the alias's learned factor. Budgets compare
    `upstream_tokens(sum of counts)` with the window.
    """

    @property
    def name(self) -> str: ...

    @property
    def exact(self) -> bool: ...

    @property
    def overhead(self) -> Overhead: ...

    def count_text(self, text: str) -> int: ...

    def count_message(self, message: Message) -> int: ...

    def count_messages(self, messages: Iterable[Message]) -> int: ...

    def upstream_tokens(self, counted: int) -> int: ...


def content_parts(content: Any) -> Iterator[tuple[str, str]]:
    """(kind, text) of each part of a message's content: ("text", text) for text and refusals,
    ("media", "") for an image or any other non-text part."""
    if content is None:
        return
    if isinstance(content, str):
        yield "text", content
        return
    if not isinstance(content, list):
        yield "text", str(content)
        return
    for part in content:
        if not isinstance(part, Mapping):
            yield "text", str(part)
            continue
        kind = part.get("type")
        if kind == "text":
            yield "text", str(part.get("text") or "")
        elif kind == "refusal":
            yield "text", str(part.get("refusal") or "")
        else:
            yield "media", str(_image_detail(part))


def _image_detail(part: Mapping[str, Any]) -> str:
    image = part.get("image_url")
    return str(image.get("detail") or "") if isinstance(image, Mapping) else ""


def tool_calls(message: Message) -> Iterator[tuple[str, str]]:
    """(function name, arguments) of each tool call of an assistant message."""
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            yield str(function.get("name") or ""), str(function.get("arguments") or "")
