"""One `Attempt` per provider call, on the request's `CallTrace`, and to the `LLMObserver`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from keel.llm.base import ChatModel
from keel.llm.events import ChatEvent, ChatRequest
from keel.llm.resilience._wrapper import WrapperModel, closing
from keel.llm.resilience.classify import MISCONFIGURED, FailureKind, classify, upstream_status
from keel.llm.trace import Attempt, LLMObserver

log = logging.getLogger(__name__)


class InstrumentedModel(WrapperModel):
    """Wraps one deployment's provider. The attempt is on the trace from its start (so headers sent at
    the first event count it); the deployment that yields a first event is the one that answered."""

    def __init__(
        self, inner: ChatModel, *, alias: str, deployment: str, upstream_model: str, observer: LLMObserver
    ) -> None:
        super().__init__(inner)
        self.alias = alias
        self.deployment = deployment
        self.upstream_model = upstream_model
        self.observer = observer

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        trace = request.trace
        attempt = Attempt(
            model=self.alias,
            deployment=self.deployment,
            provider=self.provider,
            upstream_model=self.upstream_model,
            started=time.perf_counter(),
        )
        trace.attempts.append(attempt)
        first = True
        try:
            async with closing(self.inner.stream(request)) as events:
                async for event in events:
                    if first:
                        first = False
                        attempt.first_token = time.perf_counter() - attempt.started
                        trace.answered_by = self.alias
                        trace.deployment = self.deployment
                        trace.upstream_model = self.upstream_model
                        trace.fallback = self.alias != request.model
                    yield event
        except Exception as exc:
            attempt.error_type = classify(exc).value
            attempt.status = upstream_status(exc)
            if attempt.error_type in MISCONFIGURED:
                log.error(
                    "deployment %r of model %r is misconfigured: the upstream answered %s (%s); "
                    "check its base_url, model and API key",
                    self.deployment,
                    self.alias,
                    attempt.status,
                    attempt.error_type,
                    extra={"deployment": self.deployment, "model": self.alias, "status": attempt.status},
                )
            raise
        except (asyncio.CancelledError, GeneratorExit):
            attempt.error_type = FailureKind.CANCELLED.value
            raise
        finally:
            attempt.latency = time.perf_counter() - attempt.started
            self.observer.attempt_finished(attempt)
