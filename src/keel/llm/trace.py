"""What happened inside one model call, for headers, the audit record and metrics.

A `CallTrace` rides on the `ChatRequest` (wrappers copy the request but share the trace): each provider
attempt appends an `Attempt`; the layer that produced the answer fills `answered_by`. An `LLMObserver`
hears retries, fallbacks and breaker changes as they happen (metrics subscribe to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Attempt:
    model: str  # the alias tried
    deployment: str  # which endpoint of that alias
    provider: str
    upstream_model: str
    started: float  # time.perf_counter()
    latency: float = 0.0  # seconds, until the attempt ended (stream done or failed)
    first_token: float | None = None  # seconds from start to the first event
    status: int | None = None  # the upstream's HTTP status, when it answered
    error_type: str | None = None  # None when the attempt succeeded


@dataclass(slots=True)
class CallTrace:
    attempts: list[Attempt] = field(default_factory=list)
    answered_by: str | None = None  # the alias whose answer the client got
    deployment: str | None = None
    upstream_model: str | None = None
    fallback: bool = False  # a fallback alias answered
    deadline: float | None = None  # time.monotonic() by which the whole call must end


class LLMObserver(Protocol):
    def attempt_finished(self, attempt: Attempt) -> None: ...

    def retried(self, model: str, reason: str) -> None: ...

    def fell_back(self, from_model: str, to_model: str) -> None: ...

    def breaker_changed(self, deployment: str, state: int) -> None:
        """state: 0 closed, 1 half-open, 2 open."""


class NoObserver:
    def attempt_finished(self, attempt: Attempt) -> None:
        pass

    def retried(self, model: str, reason: str) -> None:
        pass

    def fell_back(self, from_model: str, to_model: str) -> None:
        pass

    def breaker_changed(self, deployment: str, state: int) -> None:
        pass
