"""Token counts without a tokenizer (the gateway has none): characters / 4, rounded up.

What the limiter reserves before the call (the whole prompt plus the completion cap), and what a call is
charged when no usage arrived: a client that left mid-stream, a stream that failed. Such a count is
*estimated*, and marked so in the usage ledger and the audit record.
"""

from __future__ import annotations

from typing import Any

import orjson

from keel.llm import ChatRequest, ChatResult, Usage

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # role and separators, roughly what OpenAI's chat format adds per message


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)  # ceil without floats


def _json_chars(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except TypeError:  # not JSON (never from the wire): count its text
        return len(str(value))


def prompt_tokens(request: ChatRequest) -> int:
    """Every message (text parts, tool calls and their results) and the tool definitions."""
    chars = 0
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                chars += len(text) if isinstance(text, str) else _json_chars(part)
        tool_calls = message.get("tool_calls")
        if tool_calls:
            chars += _json_chars(tool_calls)
    if request.tools:
        chars += _json_chars(request.tools)
    return _tokens(chars) + TOKENS_PER_MESSAGE * len(request.messages)


def output_tokens(result: ChatResult) -> int:
    """What was streamed back: text, and tool calls' names and arguments."""
    chars = len(result.text)
    for call in result.tool_calls:
        function = call["function"]
        chars += len(function["name"]) + len(function["arguments"])
    return _tokens(chars)


def estimate_usage(sent: ChatRequest, result: ChatResult) -> Usage:
    """The usage of a call that reported none: the prompt as sent, and what came back before it ended."""
    return Usage(prompt_tokens(sent), output_tokens(result))
