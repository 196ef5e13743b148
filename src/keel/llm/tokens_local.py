"""Counting for the local model: its own vocabulary and its own chat template, exact.

The gateway loads only the GGUF's vocabulary (`Llama(vocab_only=True)`: 0.25 s and 34 MB for SmolLM2,
no weights), never the model. The chat template is rendered once at load, with a sentinel as content, to
learn what it writes around a message of each role; a message then costs one tokenization of
prefix + text + suffix, without rendering the conversation again. Messages go through the same mapping
as the local provider's prompt (`keel.llm.local_prompt.template_messages`), so a count is what the
worker will tokenize. A self-check at load compares the sum with the whole rendered prompt; a template
whose turns do not start and end on special tokens fails it and is counted as not `exact`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.llm.local_prompt import ROLES, template_messages, token_text
from keel.llm.tokens_base import Message, Overhead, content_parts

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

SENTINEL = "\u2060KEEL-SENTINEL\u2060"
ANCHOR = {"role": "system", "content": "A"}
SELF_CHECK: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi. What do you need?"},
    {"role": "user", "content": "Nothing, thanks."},
]


@dataclass
class _Template:
    llama: Llama
    count: Callable[[str], int]  # tokens of a text
    wrap: dict[str, tuple[str, str]]  # template role → (text before the content, text after it)
    start: dict[str, int]  # template role of the first message → tokens the template writes first
    priming: int
    exact: bool


class LocalTokenCounter:
    """Exact counts for a GGUF chat model; the vocabulary loads on first use (or `load()`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"local:{path.name}"
        self._template: _Template | None = None
        self._lock = threading.Lock()

    @property
    def exact(self) -> bool:
        return self.load().exact

    def load(self) -> _Template:
        found = self._template
        if found is None:
            with self._lock:
                if self._template is None:
                    self._template = self._load()
                found = self._template
        return found

    def close(self) -> None:
        with self._lock:
            template, self._template = self._template, None
        if template is not None:
            template.llama.close()

    def _load(self) -> _Template:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llama = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        try:
            source = llama.metadata.get("tokenizer.chat_template")
            if not source:
                raise ValueError(f"{self.path.name} carries no tokenizer.chat_template")
            eos, bos = token_text(llama, llama.token_eos()), token_text(llama, llama.token_bos())
            plain = Jinja2ChatFormatter(source, eos, bos, add_generation_prompt=False)
            primed = Jinja2ChatFormatter(source, eos, bos, add_generation_prompt=True)
            count = _counter(llama_cpp.llama_model_get_vocab(llama.model))

            def render(messages: list[dict[str, Any]], formatter: Jinja2ChatFormatter = plain) -> str:
                return formatter(messages=messages).prompt  # type: ignore[arg-type]

            base = render([ANCHOR])
            wrap: dict[str, tuple[str, str]] = {}
            start: dict[str, int] = {}
            for role in sorted(set(ROLES.values())):
                full = render([ANCHOR, {"role": role, "content": SENTINEL}])
                before, found, after = full[len(base) :].partition(SENTINEL)
                if not full.startswith(base) or not found:
                    raise ValueError(f"the chat template of {self.path.name} does not append a {role} turn")
                wrap[role] = (before, after)
                start[role] = count(render([{"role": role, "content": SENTINEL}])) - count(
                    before + SENTINEL + after
                )
            priming = count(render([ANCHOR], primed)) - count(base)
        except BaseException:
            llama.close()
            raise
        template = _Template(llama, count, wrap, start, priming, exact=True)
        whole = count(render(template_messages(SELF_CHECK), primed))
        counted = self._sum(template, SELF_CHECK)
        template.exact = whole == counted
        if not template.exact:
            log.warning(
                "token counts of %s are approximate: its chat template's turns do not tokenize apart "
                "(a test conversation is %d tokens, counted per message %d)",
                self.path.name,
                whole,
                counted,
            )
        return template

    @property
    def overhead(self) -> Overhead:
        template = self.load()
        empty = {role: self.count_message({"role": role, "content": ""}) for role in ROLES}
        call = {"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": ""}}]}
        return Overhead(
            per_message=empty,
            per_name=0,  # the template drops names
            per_tool_call=self.count_message(call) - empty["assistant"],
            reply_priming=template.priming,
            conversation_start={role: template.start[mapped] for role, mapped in ROLES.items()},
            image_part=0,  # the local model refuses non-text parts when it is called
        )

    def count_text(self, text: str) -> int:
        return self.load().count(text)

    def count_message(self, message: Message) -> int:
        template = self.load()
        turn = _turn(message)
        before, after = template.wrap[turn["role"]]
        return template.count(before + turn["content"] + after)

    def count_messages(self, messages: Iterable[Message]) -> int:
        return self._sum(self.load(), messages)

    def _sum(self, template: _Template, messages: Iterable[Message]) -> int:
        total, first = template.priming, True
        for message in messages:
            turn = _turn(message)
            if first:
                total += template.start[turn["role"]]
                first = False
            before, after = template.wrap[turn["role"]]
            total += template.count(before + turn["content"] + after)
        return total

    def upstream_tokens(self, counted: int) -> int:
        return counted


def _turn(message: Message) -> dict[str, str]:
    """The {role, content} turn the local provider renders for `message`; non-text parts dropped."""
    plain = dict(message)
    content = plain.get("content")
    if isinstance(content, list):
        plain["content"] = "\n".join(text for kind, text in content_parts(content) if kind == "text")
    return template_messages([plain])[0]


def _counter(vocab: Any) -> Callable[[str], int]:
    """Tokens of a text as the worker tokenizes its prompt (special tokens parsed, no BOS added): one
    llama.cpp call that only counts (with a zero-size buffer it returns minus the count)."""
    from llama_cpp import llama_tokenize

    def count(text: str) -> int:
        data = text.encode(errors="replace")
        return abs(int(llama_tokenize(vocab, data, len(data), None, 0, False, True))) if data else 0

    return count
