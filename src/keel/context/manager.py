"""The context manager: a conversation turn's history, fitted to the model's real token budget.

`budget = context window − tokens reserved for the answer − margin`. The window comes from the alias
(`context_window` in keel.toml; the local model's `n_ctx`; a known default for well-known upstream models);
the reserve is the request's `max_tokens`, else the alias's `max_output_tokens`, else the default guess.
An alias without a known window is not trimmed: the upstream's context-length error drives the fallback.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from keel.context.conversations import ConversationStore, History
from keel.context.window import Counter, Window, fit, known_window
from keel.llm import ChatRequest, ChatResult
from keel.settings import ContextSettings, Settings

log = logging.getLogger(__name__)

Message = dict[str, Any]
Strategy = Literal["summarize", "trim", "none"]
LEADING = ("system", "developer")
_EMPTY_USER: Message = {"role": "user", "content": ""}


class CounterSource(Protocol):
    def for_alias(self, alias: str) -> Counter: ...


class SummaryScheduler(Protocol):
    def schedule(self, tenant_id: uuid.UUID, conversation_id: str, alias: str, budget: int) -> None:
        """Ask for a new summary of the conversation; returns at once (the turn never waits)."""


@dataclass(slots=True)
class ContextDecision:
    """What the context stage decided: response headers, the audit record, and replay read it."""

    strategy: str
    tokens: int
    budget: int | None
    dropped_turns: int = 0
    summary_id: int | None = None
    sent_ids: list[int] = field(default_factory=list)
    truncated_tool_results: int = 0
    tokenizer: str = ""
    counted: int = 0  # `tokens` as the tokenizer counted them (before an estimating counter's factor)

    def headers(self) -> dict[str, str]:
        return {
            "x-keel-context-tokens": str(self.tokens),
            "x-keel-context-dropped": str(self.dropped_turns),
            "x-keel-context-summary": str(self.summary_id) if self.summary_id is not None else "none",
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "tokens": self.tokens,
            "budget": self.budget,
            "dropped_turns": self.dropped_turns,
            "summary_id": self.summary_id,
            "message_ids": self.sent_ids,
            "truncated_tool_results": self.truncated_tool_results,
            "tokenizer": self.tokenizer,
        }


def summary_message(text: str) -> Message:
    return {"role": "system", "content": f"Summary of the earlier conversation:\n{text}"}


class ContextManager:
    def __init__(
        self,
        conversations: ConversationStore,
        counters: CounterSource,
        settings: Settings,
        *,
        summaries: SummaryScheduler | None = None,
    ) -> None:
        self._conversations = conversations
        self._counters = counters
        self._settings: ContextSettings = settings.context
        self._summaries = summaries
        self._windows: dict[str, int | None] = {}
        self._caps: dict[str, int | None] = {}
        for alias, config in settings.models.items():
            window = config.context_window
            if window is None and config.provider == "local":
                window = settings.local.n_ctx
            if window is None:
                window = known_window(config.model or alias)
            self._windows[alias] = window
            cap = config.max_output_tokens
            if cap is None and config.provider == "local":
                cap = settings.local.max_output_tokens
            self._caps[alias] = cap
        self._default_reserve = settings.default_completion_tokens_estimate

    @property
    def conversations(self) -> ConversationStore:
        return self._conversations

    def strategy(self, asked: str | None) -> Strategy:
        if asked in ("summarize", "trim", "none"):
            return asked  # type: ignore[return-value]
        return self._settings.strategy

    def budget(self, request: ChatRequest) -> int | None:
        window = self._windows.get(request.model)
        if request.context_window is not None:  # a prompt version's lower window
            window = min(window, request.context_window) if window is not None else request.context_window
        if window is None:
            return None
        reserve = request.max_tokens or self._caps.get(request.model) or self._default_reserve
        return max(0, window - reserve - self._settings.margin_tokens)

    def fit_retrieved(self, request: ChatRequest, texts: list[str]) -> int:
        """How many of the retrieved chunks (best first) fit the share of the budget they may take; all of
        them when the alias's window is unknown."""
        budget = self.budget(request)
        if budget is None:
            return len(texts)
        counter = self._counters.for_alias(request.model)
        share = int(budget * self._settings.retrieval_share / _scale(counter))
        used = 0
        for i, text in enumerate(texts):
            used += counter.count_message({"role": "system", "content": text})
            if used > share:
                return i
        return len(texts)

    async def load(
        self,
        tenant_id: uuid.UUID,
        conversation_id: str,
        request: ChatRequest,
        request_id: str,
        strategy: Strategy,
    ) -> History:
        """The history and, stored durably in the same transaction, the turn's new messages."""
        budget = self.budget(request) if strategy != "none" else None
        new = [m for m in request.messages if m["role"] not in LEADING]
        return await self._conversations.begin_turn(
            tenant_id,
            conversation_id,
            new,
            request_id,
            counter=self._counters.for_alias(request.model),
            user=request.user,
            # stored counts may come from another tokenizer (or an estimating one's raw o200k count): load
            # a quarter more than fits, the window decides
            bound=budget + budget // 4 + 64 if budget is not None else None,
        )

    def assemble(
        self,
        tenant_id: uuid.UUID,
        conversation_id: str,
        request: ChatRequest,
        strategy: Strategy,
        prompt: list[Message],
        history: History,
        retrieved: list[Message],
    ) -> tuple[list[Message], ContextDecision]:
        counter = self._counters.for_alias(request.model)
        leading = [m for m in request.messages if m["role"] in LEADING]
        fixed = [*prompt, *leading]
        if history.summary is not None:
            fixed.append(summary_message(history.summary.text))
        fixed += retrieved
        if fixed:
            fixed_tokens = counter.count_messages(fixed)
        else:  # the history's first user message opens the conversation: the template's start (a
            # default system prompt, SmolLM2's) and the reply priming, without the message itself
            fixed_tokens = counter.count_messages([_EMPTY_USER]) - counter.count_message(_EMPTY_USER)
        budget = self.budget(request) if strategy != "none" else None
        scale = _scale(counter)
        if budget is None:
            window = Window(
                history=[t.message for t in history.turns],
                tokens=fixed_tokens + sum(t.tokens for t in history.turns),
                sent_ids=[t.id for t in history.turns if t.id is not None],
            )
        else:
            # an estimating counter (no tokenizer for this model) counts o200k tokens: its budget shrinks
            # by the alias's learned factor instead of every count growing
            window = fit(fixed_tokens, history.turns, int(budget / scale), counter.count_message)
        decision = ContextDecision(
            strategy=strategy,
            tokens=window.tokens if scale == 1.0 else math.ceil(window.tokens * scale),
            counted=window.tokens,
            budget=budget,
            # every user turn not sent word for word: trimmed now, summarized before, or never loaded
            dropped_turns=max(0, history.users - sum(1 for m in window.history if m.get("role") == "user")),
            summary_id=history.summary.id if history.summary is not None else None,
            sent_ids=window.sent_ids,
            truncated_tool_results=window.truncated_tool_results,
            tokenizer=counter.name,
        )
        if (
            strategy == "summarize"
            and budget
            and self._summaries is not None
            and (decision.dropped_turns > 0 or window.tokens >= self._settings.summary_threshold * budget)
        ):
            self._summaries.schedule(tenant_id, conversation_id, request.model, budget)
        return [*fixed, *window.history], decision

    async def commit_reply(
        self, tenant_id: uuid.UUID, conversation_id: str, alias: str, request_id: str, result: ChatResult
    ) -> None:
        """The turn's reply, committed before the client gets its last byte."""
        reply = reply_message(result)
        counter = self._counters.for_alias(alias)
        await self._conversations.commit_reply(
            tenant_id,
            conversation_id,
            reply,
            request_id,
            tokens=counter.count_message(reply),
            tokenizer=counter.name,
        )


def _scale(counter: Counter) -> float:
    """1.0 for an exact tokenizer; an estimating counter's learned factor otherwise."""
    if getattr(counter, "exact", True):
        return 1.0
    return float(getattr(counter, "factor", 1.0))


class FactorRecorder:
    """Teaches estimating counters their alias's factor: Keel's count of a conversation turn's prompt
    against the prompt_tokens the upstream reported (turns without tool definitions, which are not
    counted)."""

    def __init__(self, counters: Any) -> None:
        self._counters = counters

    def record(self, outcome: Any) -> None:
        call = outcome.call
        decision = call.context
        usage = outcome.result.usage
        if decision is None or usage is None or call.usage_estimated or outcome.sent.tools:
            return
        counter = self._counters.for_alias(call.request.model)
        if getattr(counter, "exact", True) or outcome.sent.trace.fallback:
            return
        self._counters.factors.observe(call.request.model, decision.counted, usage.input_tokens)


def reply_message(result: ChatResult) -> Message:
    reply: Message = {"role": "assistant", "content": result.text or None}
    if result.tool_calls:
        reply["tool_calls"] = result.tool_calls
    return reply


def decision_headers(decision: ContextDecision | None) -> Mapping[str, str]:
    return decision.headers() if decision is not None else {}
