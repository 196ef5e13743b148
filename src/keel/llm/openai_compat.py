"""OpenAI Chat Completions, streamed: OpenAI itself and any compatible server (vLLM, Ollama, llama.cpp).

The wire format is spoken directly rather than through the SDK: measured about 7x faster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from keel.errors import UpstreamError
from keel.llm.events import ChatEvent, ChatRequest, Finish, TextDelta, ToolCallDelta, Usage
from keel.llm.http import HttpClient
from keel.llm.sse import post_sse
from keel.settings import ModelConfig

# Legacy "function_call" is today's "tool_calls"; anything unknown reads as a normal stop.
_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class OpenAIChatModel:
    provider = "openai"

    def __init__(self, alias: str, config: ModelConfig, client: HttpClient) -> None:
        self.alias = alias
        self.model = config.model or alias
        self._config = config
        self._client = client
        self._url = f"{config.upstream_base_url()}/chat/completions"
        self._api_key = config.resolved_api_key()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
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
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        max_tokens = request.max_tokens if request.max_tokens is not None else self._config.max_output_tokens
        optional = {
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop or None,
            "seed": request.seed,
            "user": request.user,
            "tools": request.tools,
            "tool_choice": request.tool_choice,
        }
        body.update((key, value) for key, value in optional.items() if value is not None)
        return body

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        finish: str | None = None
        usage: Usage | None = None
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
                if event.data == "[DONE]":
                    continue  # keep reading to the end so the connection can be reused
                chunk = self._decode(event.data)
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta")
                    if delta:
                        content = delta.get("content")
                        if content:
                            yield TextDelta(content)
                        for call in delta.get("tool_calls") or ():
                            function = call.get("function") or {}
                            yield ToolCallDelta(
                                index=call.get("index", 0),
                                id=call.get("id"),
                                name=function.get("name"),
                                arguments=function.get("arguments") or "",
                            )
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                counts = chunk.get("usage")
                if counts:
                    details = counts.get("prompt_tokens_details") or {}
                    usage = Usage(
                        counts.get("prompt_tokens") or 0,
                        counts.get("completion_tokens") or 0,
                        details.get("cached_tokens") or 0,
                    )
        if finish is None:
            raise self._error("the stream ended without a finish_reason")
        if usage is not None:
            yield usage
        yield Finish(_FINISH_REASONS.get(finish, "stop"))

    def _decode(self, data: str) -> Any:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._error(f"malformed stream chunk {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise self._error(f"malformed stream chunk {data[:200]!r}")
        error = chunk.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            raise self._error(f"error in stream: {message}")
        return chunk

    def _error(self, what: str) -> UpstreamError:
        return UpstreamError(f"openai model {self.model!r}: {what}", provider=self.provider, model=self.model)
