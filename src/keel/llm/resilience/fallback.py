"""The fallback chain of an alias: itself, then each of its `fallbacks` in order, until one answers.

Moving on happens only before the first event. A request the upstream refused as wrong (400) goes back
to the client at once; one too long for the model goes to the next alias with a larger context window.
When all fail, one error lists every attempt (alias, deployment, error kind, status), never an upstream
body or a key: 504 when the deadline ran out, 503 when everything was unavailable (breakers open,
overloaded, unreachable), 502 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.errors import (
    KeelError,
    OverloadedError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from keel.llm.base import ChatModel, Opened, open_stream
from keel.llm.events import ChatRequest
from keel.llm.resilience._wrapper import OpeningWrapper
from keel.llm.resilience.classify import UNAVAILABLE, FailureKind, classify
from keel.llm.resilience.deadline import expired
from keel.llm.trace import CallTrace, LLMObserver


@dataclass(frozen=True, slots=True)
class Link:
    alias: str
    model: ChatModel  # the alias's retrying stack
    context_window: int | None = None


class FallbackModel(OpeningWrapper):
    def __init__(self, chain: list[Link], *, observer: LLMObserver) -> None:
        super().__init__(chain[0].model)
        self.chain = chain
        self.alias = chain[0].alias
        self.observer = observer

    async def open(self, request: ChatRequest) -> Opened:
        trace = request.trace
        skipped: list[str] = []  # aliases passed over because their breakers were open
        last: KeelError | None = None
        too_long: KeelError | None = None
        at_least: int | None = None  # after a context-length error: only larger windows
        previous = ""
        for link in self.chain:
            if at_least is not None and (link.context_window or 0) <= at_least:
                continue
            if last is not None:
                if expired(trace):
                    break
                self.observer.fell_back(previous, link.alias)
            previous = link.alias
            try:
                return await open_stream(link.model, request)
            except KeelError as exc:
                kind = classify(exc)
                if kind is FailureKind.INVALID_REQUEST:
                    raise
                if kind is FailureKind.CONTEXT_LENGTH:
                    too_long = too_long or exc
                    at_least = max(at_least or 0, link.context_window or 0)
                elif kind is FailureKind.CIRCUIT_OPEN:
                    skipped.append(link.alias)
                last = exc
        if too_long is not None and not expired(trace):
            raise too_long  # no larger model could take it: the client must shorten the request
        assert last is not None
        raise exhausted(self.alias, trace, skipped, last)


def exhausted(alias: str, trace: CallTrace, skipped: list[str], last: KeelError) -> KeelError:
    """The one error for "every deployment and fallback failed"."""
    kinds = {a.error_type for a in trace.attempts} | ({FailureKind.CIRCUIT_OPEN.value} if skipped else set())
    if kinds == {FailureKind.CAPACITY.value} and isinstance(last, OverloadedError):
        return last  # only our own capacity was short: the local model's 503 and its Retry-After
    tried = [
        f"{a.model} via {a.deployment}: {a.error_type}" + (f" {a.status}" if a.status else "")
        for a in trace.attempts
    ]
    tried += [f"{name}: circuit open" for name in skipped]
    count = len(trace.attempts)
    summary = f"{count} attempt{'s' if count != 1 else ''}" + (f": {'; '.join(tried)}" if tried else "")
    provider = getattr(last, "provider", "keel")
    if expired(trace) or FailureKind.DEADLINE.value in kinds:
        return UpstreamTimeoutError(
            f"Model {alias!r} did not answer before the request's deadline ({summary}).",
            provider=provider,
            model=alias,
            code="deadline_exceeded",
        )
    if kinds and kinds <= {kind.value for kind in UNAVAILABLE}:
        code = "circuit_open" if kinds == {FailureKind.CIRCUIT_OPEN.value} else "upstream_unavailable"
        return UpstreamUnavailableError(
            f"Model {alias!r} is unavailable: every deployment and fallback failed ({summary}).",
            provider=provider,
            model=alias,
            code=code,
        )
    return UpstreamError(
        f"Model {alias!r} failed: every deployment and fallback failed ({summary}).",
        provider=provider,
        model=alias,
        code="all_attempts_failed",
    )
