"""OpenAI-format messages → the prompt tokens of the local model, through the model's own chat template."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keel.errors import InvalidRequestError

if TYPE_CHECKING:
    from llama_cpp import Llama

# SmolLM2 knows system, user and assistant only: developer is a system turn, a tool result user text.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "user"}


def content_text(content: Any, index: int) -> str:
    """A message's content as one string: a plain string, or the text of a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise InvalidRequestError(
                    f"messages[{index}]: the local model accepts text content only, not {kind!r} parts",
                    param=f"messages[{index}].content",
                )
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise InvalidRequestError(
        f"messages[{index}]: content must be a string or a list of text parts",
        param=f"messages[{index}].content",
    )


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Plain {role, content} turns that the chat template renders."""
    turns = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"messages[{index}]: unknown role {role!r}", param=f"messages[{index}].role"
            )
        text = content_text(message.get("content"), index)
        if role == "tool":
            text = f"Tool result: {text}"
        elif role == "assistant":
            # History from a tool-capable model: keep the calls as text so the turn is not lost.
            calls = [call.get("function", {}) for call in message.get("tool_calls") or []]
            lines = [f"Tool call: {call.get('name', '')}({call.get('arguments', '')})" for call in calls]
            text = "\n".join([text, *lines]) if text else "\n".join(lines)
        turns.append({"role": ROLES[role], "content": text})
    return turns


class PromptEncoder:
    """Renders messages with the GGUF's `tokenizer.chat_template`, tokenizes with the model's vocabulary."""

    def __init__(self, llama: Llama) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the GGUF file carries no tokenizer.chat_template")
        self._llama = llama
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=token_text(llama, llama.token_eos()),
            bos_token=token_text(llama, llama.token_bos()),
        )

    def prompt(self, messages: list[dict[str, Any]]) -> str:
        return self._formatter(messages=template_messages(messages)).prompt  # type: ignore[arg-type]

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        # As llama-cpp-python's own chat handler does: the template writes any BOS, special tokens parse.
        tokens: list[int] = self._llama.tokenize(self.prompt(messages).encode(), add_bos=False, special=True)
        return tokens


def token_text(llama: Llama, token: int) -> str:
    if token < 0:
        return ""
    return bytes(llama.detokenize([token], special=True)).decode(errors="replace")
