"""The Anthropic Messages API, streamed over keel.llm.http, behind the OpenAI-shaped `ChatModel` interface.

Requests arrive as OpenAI chat messages and are translated here: system prompts move to the top-level
`system`, tool calls and results become `tool_use` / `tool_result` blocks, and consecutive messages of
one role are merged because Anthropic requires user and assistant turns to alternate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from keel.errors import InvalidRequestError, UpstreamError, UpstreamUnavailableError
from keel.llm.events import ChatEvent, ChatRequest, Finish, TextDelta, ToolCallDelta, Usage
from keel.llm.http import HttpClient
from keel.llm.sse import post_sse
from keel.settings import ModelConfig

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; used when neither request nor config sets one

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_TOOL_CHOICES = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}


class AnthropicChatModel:
    provider = "anthropic"

    def __init__(self, alias: str, config: ModelConfig, client: HttpClient) -> None:
        self.alias = alias
        self.model = config.model or alias
        self._config = config
        self._client = client
        self._url = f"{config.upstream_base_url()}/v1/messages"
        self._api_key = config.resolved_api_key()
        headers = {"Content-Type": "application/json", "anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        headers.update(config.headers)
        self._headers = headers
        self._timeout = config.timeout
        self._connect_timeout = config.connect_timeout
        self._ca_bundle = str(config.ca_bundle) if config.ca_bundle is not None else None

    def supports_tools(self) -> bool:
        return True

    async def aclose(self) -> None:
        """The client is shared and owned by whoever built it."""

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        system, messages = translate_messages(request.messages)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens or self._config.max_output_tokens or DEFAULT_MAX_TOKENS,
            "messages": messages,
            "stream": True,
        }
        if system:
            body["system"] = system
        if request.stop:
            body["stop_sequences"] = request.stop
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.user:
            body["metadata"] = {"user_id": request.user}
        if request.tools:
            body["tools"] = [_tool(tool) for tool in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice)
        return body  # seed has no Anthropic counterpart and is dropped

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        input_tokens = output_tokens = cached_tokens = 0
        stop_reason: str | None = None
        tools: dict[int, int] = {}  # content block index -> tool call index
        tools_with_arguments: set[int] = set()
        events = post_sse(
            self._client,
            self._url,
            body=orjson.dumps(self._payload(request)),
            headers=self._headers,
            total=self._timeout,
            connect_timeout=self._connect_timeout,
            provider=self.provider,
            model=self.model,
            secret=self._api_key,
            ca_bundle=self._ca_bundle,
        )
        async with aclosing(events):
            async for event in events:
                data = self._decode(event.data)
                kind = data.get("type")
                if kind == "content_block_delta":
                    delta = data.get("delta") or {}
                    if delta.get("type") == "text_delta":
                        if delta.get("text"):
                            yield TextDelta(delta["text"])
                    elif delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                        index = self._tool_index(tools, data.get("index"))
                        tools_with_arguments.add(index)
                        yield ToolCallDelta(index=index, arguments=delta["partial_json"])
                    # thinking, signature and citations deltas are not part of the OpenAI shape
                elif kind == "content_block_start":
                    block = data.get("content_block") or {}
                    if block.get("type") == "tool_use":
                        index = len(tools)
                        tools[data.get("index", 0)] = index
                        yield ToolCallDelta(index=index, id=block.get("id"), name=block.get("name"))
                    elif block.get("type") == "text" and block.get("text"):
                        yield TextDelta(block["text"])
                elif kind == "content_block_stop":
                    index = tools.get(data.get("index", 0), -1)
                    if index >= 0 and index not in tools_with_arguments:
                        yield ToolCallDelta(index=index, arguments="{}")  # a tool called with no input
                elif kind == "message_start":
                    counts = (data.get("message") or {}).get("usage") or {}
                    input_tokens = _input_tokens(counts)
                    cached_tokens = counts.get("cache_read_input_tokens") or 0
                    output_tokens = counts.get("output_tokens") or 0
                elif kind == "message_delta":
                    stop_reason = (data.get("delta") or {}).get("stop_reason") or stop_reason
                    counts = data.get("usage") or {}
                    if counts.get("output_tokens") is not None:
                        output_tokens = counts["output_tokens"]
                    if counts.get("input_tokens") is not None:
                        input_tokens = _input_tokens(counts)
                        cached_tokens = counts.get("cache_read_input_tokens") or 0
                elif kind == "error":
                    raise self._stream_error(data.get("error"))
                # ping, content_block_stop of text, message_stop: nothing to pass on
        if stop_reason is None:
            raise self._error("the stream ended without a stop_reason")
        yield Usage(input_tokens, output_tokens, cached_tokens)
        yield Finish(_FINISH_REASONS.get(stop_reason, "stop"))

    def _decode(self, data: str) -> Any:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._error(f"malformed stream event {data[:200]!r}") from None
        if not isinstance(payload, dict):
            raise self._error(f"malformed stream event {data[:200]!r}")
        return payload

    def _tool_index(self, tools: dict[int, int], block: Any) -> int:
        if block not in tools:
            raise self._error(f"tool input for content block {block!r}, which is not a tool_use block")
        return tools[block]

    def _stream_error(self, error: Any) -> UpstreamError:
        kind = error.get("type") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        text = f"anthropic model {self.model!r}: error in stream: {kind}: {message}"
        if kind == "overloaded_error":
            return UpstreamUnavailableError(text, provider=self.provider, model=self.model)
        return UpstreamError(text, provider=self.provider, model=self.model)

    def _error(self, what: str) -> UpstreamError:
        return UpstreamError(
            f"anthropic model {self.model!r}: {what}", provider=self.provider, model=self.model
        )


def _input_tokens(counts: dict[str, Any]) -> int:
    # Anthropic counts cache reads and writes apart; OpenAI's prompt_tokens includes them.
    return sum(
        counts.get(key) or 0
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


def translate_messages(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI chat messages → (Anthropic `system`, Anthropic `messages`)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = content if isinstance(content, str) else "\n".join(b["text"] for b in _blocks(content))
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _blocks(content)
        elif role == "assistant":
            blocks = _blocks(content) + [_tool_use(call) for call in message.get("tool_calls") or ()]
        elif role == "tool":
            role = "user"
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
            if content:
                result["content"] = content if isinstance(content, str) else _blocks(content)
            blocks = [result]
        else:
            raise InvalidRequestError(
                f"anthropic models take no messages with role {role!r}", param="messages"
            )
        if not blocks:
            continue  # Anthropic rejects empty content
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return "\n\n".join(system), out


def _blocks(content: Any) -> list[dict[str, Any]]:
    if not content:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url")))
        else:
            raise InvalidRequestError(
                f"anthropic models take no content parts of type {kind!r}", param="messages"
            )
    return blocks


def _image(image_url: Any) -> dict[str, Any]:
    url = image_url.get("url", "") if isinstance(image_url, dict) else str(image_url or "")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = orjson.loads(function.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequestError(
            f"tool call {call.get('id')!r} has arguments that are not a JSON object", param="messages"
        )
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise InvalidRequestError("anthropic models take only tools of type 'function'", param="tools")
    spec = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        spec["description"] = function["description"]
    return spec


def _tool_choice(choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return dict(_TOOL_CHOICES[choice])
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"type": "tool", "name": name}
    raise InvalidRequestError(f"unsupported tool_choice {choice!r}", param="tool_choice")
