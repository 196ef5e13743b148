"""Counting with OpenAI's encodings: exact for the OpenAI families, and the estimate for everything else.

The message overhead is the formula of OpenAI's cookbook ("How to count tokens with tiktoken", section 6),
which its authors checked against the prompt_tokens the API reports (129 tokens for gpt-3.5-turbo and
gpt-4, 124 for gpt-4o and gpt-4o-mini on their example): 3 tokens per message plus its role, 1 more for a
`name` besides the name's tokens, 3 to prime the reply.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from keel.llm.tokens_base import Message, Overhead, content_parts, tool_calls
from keel.llm.tokens_bpe import encoding

if TYPE_CHECKING:
    import tiktoken

    from keel.llm.tokens_factors import TokenFactors

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3  # <|start|>assistant<|message|>
# Not published by OpenAI: an allowance for the framing of each tool call in an assistant message.
TOKENS_PER_TOOL_CALL = 3
# OpenAI's image pricing: 85 tokens at detail "low"; otherwise 85 + 170 per 512-pixel tile. Keel does not
# fetch images to learn their size, so a part costs the 4 tiles of a 1024×1024 image.
IMAGE_TOKENS = 85 + 4 * 170
IMAGE_TOKENS_LOW = 85
# For an unknown tokenizer: Anthropic's cost of its largest image (about 1.15 megapixels / 750).
ESTIMATE_IMAGE_TOKENS = 1600
ROLES = ("system", "developer", "user", "assistant", "tool")


class TiktokenCounter:
    """Exact for OpenAI's chat models on `encoding_name` (o200k_base or cl100k_base); shared by every
    alias on that encoding. The BPE file loads on first use (or `load()`)."""

    exact = True

    def __init__(
        self, encoding_name: str, *, image_tokens: int = IMAGE_TOKENS, kind: str = "tiktoken"
    ) -> None:
        self.name = f"{kind}:{encoding_name}"
        self.encoding_name = encoding_name
        self._image_tokens = image_tokens
        self._encoding: tiktoken.Encoding | None = None
        self._roles: dict[str, int] = {}
        self._lock = threading.Lock()

    def load(self) -> tiktoken.Encoding:
        found = self._encoding
        if found is None:
            with self._lock:
                if self._encoding is None:
                    loaded = encoding(self.encoding_name)
                    self._roles = {role: len(loaded.encode_ordinary(role)) for role in ROLES}
                    self._encoding = loaded
                found = self._encoding
        return found

    @property
    def overhead(self) -> Overhead:
        self.load()
        return Overhead(
            per_message={role: TOKENS_PER_MESSAGE + tokens for role, tokens in self._roles.items()},
            per_name=TOKENS_PER_NAME,
            per_tool_call=TOKENS_PER_TOOL_CALL,
            reply_priming=REPLY_PRIMING,
            conversation_start={},
            image_part=self._image_tokens,
        )

    def count_text(self, text: str) -> int:
        return len(self.load().encode_ordinary(text))

    def count_message(self, message: Message) -> int:
        encode = self.load().encode_ordinary
        role = str(message.get("role") or "")
        role_tokens = self._roles.get(role)
        tokens = TOKENS_PER_MESSAGE + (role_tokens if role_tokens is not None else len(encode(role)))
        for kind, text in content_parts(message.get("content")):
            if kind == "text":
                tokens += len(encode(text))
            else:
                tokens += IMAGE_TOKENS_LOW if text == "low" else self._image_tokens
        name = message.get("name")
        if name:
            tokens += TOKENS_PER_NAME + len(encode(str(name)))
        for function, arguments in tool_calls(message):
            tokens += TOKENS_PER_TOOL_CALL + len(encode(function)) + len(encode(arguments))
        call_id = message.get("tool_call_id")
        if call_id:
            tokens += len(encode(str(call_id)))
        return tokens

    def count_messages(self, messages: Iterable[Message]) -> int:
        return sum(self.count_message(message) for message in messages) + REPLY_PRIMING

    def upstream_tokens(self, counted: int) -> int:
        return counted


class EstimateCounter:
    """An alias whose tokenizer Keel does not have (Anthropic, unknown OpenAI-compatible models): counts
    are o200k tokens with OpenAI's overhead (`estimate:o200k_base`, shared by every such alias), and
    `upstream_tokens` multiplies them by the alias's factor, learned from the prompt_tokens it reports."""

    exact = False

    def __init__(self, alias: str, base: TiktokenCounter, factors: TokenFactors) -> None:
        self.alias = alias
        self._base = base
        self._factors = factors
        self.name = base.name

    @property
    def factor(self) -> float:
        return self._factors.factor(self.alias)

    @property
    def overhead(self) -> Overhead:
        return self._base.overhead

    def load(self) -> None:
        self._base.load()

    def count_text(self, text: str) -> int:
        return self._base.count_text(text)

    def count_message(self, message: Message) -> int:
        return self._base.count_message(message)

    def count_messages(self, messages: Iterable[Message]) -> int:
        return self._base.count_messages(messages)

    def upstream_tokens(self, counted: int) -> int:
        return math.ceil(counted * self._factors.factor(self.alias))


def estimate_base() -> TiktokenCounter:
    return TiktokenCounter("o200k_base", image_tokens=ESTIMATE_IMAGE_TOKENS, kind="estimate")
