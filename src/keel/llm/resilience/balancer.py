"""The deployments of one alias: each call goes to one of them, weighted, healthy ones first.

A deployment is left out when its breaker is open, or when it already failed this request in a way that
rules it out (refused connection, 401/403/404). Among the rest, one not yet tried by this request is
preferred (a retry goes elsewhere when it can), then one with a free concurrency slot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from keel.llm.base import ChatModel, Opened, open_stream
from keel.llm.events import ChatRequest
from keel.llm.resilience._wrapper import OpeningWrapper
from keel.llm.resilience.breaker import CircuitBreaker
from keel.llm.resilience.classify import DEPLOYMENT_FATAL, CircuitOpenError, NoDeploymentLeftError
from keel.llm.resilience.limit import ConcurrencyLimit


@dataclass(slots=True)
class Deployment:
    name: str
    model: ChatModel  # its stack: breaker → limit → instrumentation → timeouts → provider
    weight: float = 1.0
    breaker: CircuitBreaker | None = None
    limit: ConcurrencyLimit | None = None

    def healthy(self) -> bool:
        return self.breaker is None or self.breaker.available()

    def has_capacity(self) -> bool:
        return self.limit is None or self.limit.has_capacity()


class Balancer(OpeningWrapper):
    def __init__(
        self, alias: str, deployments: list[Deployment], *, rng: random.Random | None = None
    ) -> None:
        super().__init__(deployments[0].model)
        self.alias = alias
        self.deployments = deployments
        self._rng = rng or random.Random()

    async def open(self, request: ChatRequest) -> Opened:
        attempts = request.trace.attempts
        ruled_out = {a.deployment for a in attempts if a.error_type in DEPLOYMENT_FATAL}
        tried = {a.deployment for a in attempts}
        candidates = [d for d in self.deployments if d.name not in ruled_out]
        if not candidates:
            raise NoDeploymentLeftError(
                f"every deployment of model {self.alias!r} failed this request",
                provider=self.provider,
                model=self.alias,
            )
        while True:
            healthy = [d for d in candidates if d.healthy()]
            if not healthy:
                raise CircuitOpenError(
                    f"model {self.alias!r} is skipped: the circuit breakers of all its deployments are open",
                    provider=self.provider,
                    model=self.alias,
                )
            chosen = self._choose(healthy, tried)
            try:
                return await open_stream(chosen.model, request)
            except CircuitOpenError:  # opened between the choice and the call: choose again
                candidates.remove(chosen)

    def _choose(self, healthy: list[Deployment], tried: set[str]) -> Deployment:
        if len(healthy) == 1:
            return healthy[0]
        fresh = [d for d in healthy if d.name not in tried] or healthy
        roomy = [d for d in fresh if d.has_capacity()] or fresh
        return self._rng.choices(roomy, weights=[d.weight for d in roomy])[0]
