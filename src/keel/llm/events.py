"""The typed stream every `ChatModel` yields, whatever the provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keel.llm.trace import CallTrace

FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call: `id` and `name` come with its first piece, `arguments` in pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int  # every prompt token, cached ones included
    output_tokens: int
    cached_input_tokens: int = 0  # of input_tokens, read from the provider's prompt cache (priced lower)


@dataclass(frozen=True, slots=True)
class Finish:
    """The last event of every stream (usage, when known, comes before it)."""

    reason: str  # one of FINISH_REASONS


ChatEvent = TextDelta | ToolCallDelta | Usage | Finish


@dataclass(slots=True)
class ChatRequest:
    """What the pipeline asks of a model: OpenAI-format messages plus sampling parameters.

    Messages stay in the OpenAI Chat Completions shape (the lingua franca); a provider that speaks
    another format translates them.
    """

    model: str  # the alias the client asked for
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # a window lower than the alias's, set by the prompt version: the context manager fits history to it
    context_window: int | None = None
    trace: CallTrace = field(default_factory=CallTrace)  # shared by the copies wrappers make


@dataclass(slots=True)
class ChatResult:
    """A stream collected: what a non-streaming response is built from."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage | None = None
    finished: bool = False  # a Finish event came: the answer is whole (a cut stream's is not)

    def add(self, event: ChatEvent) -> None:
        if isinstance(event, TextDelta):
            self.text += event.text
        elif isinstance(event, ToolCallDelta):
            while len(self.tool_calls) <= event.index:
                self.tool_calls.append(
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
            call = self.tool_calls[event.index]
            if event.id:
                call["id"] = event.id
            if event.name:
                call["function"]["name"] += event.name
            call["function"]["arguments"] += event.arguments
        elif isinstance(event, Usage):
            self.usage = event
        else:
            self.finish_reason = event.reason
            self.finished = True
