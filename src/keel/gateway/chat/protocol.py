"""OpenAI Chat Completions wire models, fields in the order of the OpenAI reference.

Unknown-field policy: refused with a 400 that names the field. Silently ignoring a parameter the client
relies on (say `response_format`) would be a quiet wrong answer; a clear error is better.

Bounds: every list and every free-form string that is not message text has a cap (the constants below,
OpenAI's own where it documents one), checked while the body is parsed, so a request cannot make Keel
store 100 000 conversation rows or match a megabyte stop string; a request over a cap is a 400 naming the
field. Message text is bounded by the body size and the tier's tokens per minute.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from keel.llm import ChatResult, Usage

MAX_MESSAGES = 2048  # OpenAI's limit; each new turn of a conversation is a stored row
MAX_TOOLS = 128  # OpenAI's limit
MAX_TOOL_CALLS = 128  # per assistant message of the history
MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop sequence: every streamed token is matched against it
MAX_USER_CHARS = 256  # stored in the audit record and the usage ledger
MAX_MODEL_CHARS = 256
MAX_NAME_CHARS = 256  # a participant's name, a tool call's id
MAX_FUNCTION_NAME_CHARS = 64  # OpenAI's limit
MAX_PROMPT_VARIABLES = 64  # their names are kept in the audit record
MAX_VECTOR_STORES = 16  # searched per turn by `file_search`
MAX_VARIABLE_NAME_CHARS = 64


Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
StopSequence = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
VariableName = Annotated[str, StringConstraints(max_length=MAX_VARIABLE_NAME_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class FunctionCall(_Strict):
    name: Name
    arguments: str


class ToolCall(_Strict):
    id: Name
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system"]
    content: Content
    name: Name | None = None


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: Content
    name: Name | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content
    name: Name | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Content | None = None
    refusal: str | None = None
    name: Name | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: Name


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=MAX_FUNCTION_NAME_CHARS)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(_Strict):
    include_usage: bool = False


class PromptReference(_Strict):
    """`{"name", "label"?, "version"?, "variables"?}`; with the header, `variables` alone is enough."""

    name: str | None = Field(default=None, min_length=1, max_length=128)
    label: str | None = Field(default=None, min_length=1, max_length=63)
    version: int | None = Field(default=None, ge=1)
    variables: dict[VariableName, Any] | None = Field(default=None, max_length=MAX_PROMPT_VARIABLES)


class ContextOptions(_Strict):
    """`{"strategy": "summarize" | "trim" | "none"}`: how a conversation's history is fitted."""

    strategy: Literal["summarize", "trim", "none"] | None = None


class FileSearchOptions(_Strict):
    """`{"vector_store_ids": [...], "max_num_results": N}`: knowledge bases searched for this turn."""

    vector_store_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=MAX_VECTOR_STORES
    )
    max_num_results: int = Field(default=5, ge=1, le=50)


class ChatCompletionRequest(_Strict):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)  # the default model when absent
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = None
    seed: int | None = None
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    # Keel's extension: the conversation this turn belongs to (or header X-Keel-Conversation-Id).
    conversation_id: str | None = Field(default=None, min_length=1, max_length=128)
    # Keel's extension: a registry prompt rendered before the messages (or header X-Keel-Prompt).
    prompt: PromptReference | None = None
    # Keel's extension: how a conversation's history is fitted to the model's window.
    context: ContextOptions | None = None
    # Keel's extension: search these vector stores and put the best chunks in the context, cited [n].
    file_search: FileSearchOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_bounds(cls, stop: Any) -> Any:
        """The caps again, for a clear message: a union's own error would start with the wrong member
        ("Input should be a valid string" for five stop sequences)."""
        sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(sequences) > MAX_STOP:
            raise PydanticCustomError(
                "too_long",
                "at most {limit} stop sequences, not {count}",
                {"limit": MAX_STOP, "count": len(sequences)},
            )
        for sequence in sequences:
            if isinstance(sequence, str) and len(sequence) > MAX_STOP_CHARS:
                raise PydanticCustomError(
                    "string_too_long",
                    "a stop sequence may have at most {limit} characters, not {count}",
                    {"limit": MAX_STOP_CHARS, "count": len(sequence)},
                )
        return stop


# --- responses ------------------------------------------------------------------------------------
# The answers are built as dicts (`completion_json`, `ChunkWriter`: the hot path); these models describe
# them for /openapi.json, and tests/gateway/test_openapi.py holds real answers to them.


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str | None
    refusal: None = None
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    finish_reason: str | None
    index: int
    logprobs: None = None
    message: CompletionMessage


class Source(BaseModel):
    index: int = Field(description="The [n] the answer cites.")
    file_id: str
    filename: str
    page: int | None
    score: float
    chunk_id: str


class ChatCompletion(BaseModel):
    """The answer of a request with `"stream": false` (or none)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    choices: list[Choice]
    created: int
    model: str = Field(description="The alias that answered (a fallback's when one did).")
    object: Literal["chat.completion"]
    system_fingerprint: None = None
    usage: CompletionUsage
    cost: float | None = Field(default=None, description="Keel: what the call cost in USD (keel.costs).")
    sources: list[Source] | None = Field(
        default=None, description="Keel: the retrieved chunks the context held, cited [n] (file_search)."
    )


class ChunkFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    arguments: str


class ChunkToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


class ChunkDelta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str | None = None
    role: Literal["assistant"] | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delta: ChunkDelta
    finish_reason: str | None
    index: int
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a request with `"stream": true`; the stream ends with `data: [DONE]`. With
    `stream_options.include_usage`, every chunk has `"usage": null` and a last one with no choices carries
    the usage."""

    model_config = ConfigDict(extra="forbid")
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"]
    system_fingerprint: None = None
    usage: CompletionUsage | None = None
    cost: float | None = Field(default=None, description="Keel: the call's cost in USD, with the usage.")
    sources: list[Source] | None = Field(
        default=None, description="Keel: in one chunk with no choices before [DONE] (file_search)."
    )


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI sends them; mid-stream, the same object as one `data:` event."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


def usage_json(usage: Usage | None) -> dict[str, int]:
    prompt = usage.input_tokens if usage else 0
    completion = usage.output_tokens if usage else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_json(completion_id: str, created: int, model: str, result: ChatResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text or None, "refusal": None}
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
        ],
        "usage": usage_json(result.usage),
    }


class ChunkWriter:
    """Builds the SSE lines of one streamed completion."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage
        self._role_sent = False

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        chunk = {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def sources(self, sources: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {**self._base, "choices": [], "sources": sources}
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, usage: Usage | None) -> dict[str, Any] | None:
        if not self._include_usage:
            return None
        return {**self._base, "choices": [], "usage": usage_json(usage)}
