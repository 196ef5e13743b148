"""The one place the resilience wrappers are composed, per alias, from settings:

DeadlineModel                     the request's total deadline (when the gateway set none)
└── FallbackModel                 the alias, then its fallbacks, each one's stack below
    └── RetryModel                retries with backoff, over the alias's deployments
        └── Balancer              a healthy deployment, by weight
            └── BreakerModel      per deployment: skip while open
                └── ConcurrencyLimit   (when max_concurrent is set)
                    └── InstrumentedModel   one Attempt per call, on the trace
                        └── AttemptTimeouts     first-token and idle limits
                            └── provider        openai / anthropic / local
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keel.llm.base import ChatModel
from keel.llm.resilience.balancer import Balancer, Deployment
from keel.llm.resilience.breaker import BreakerModel, CircuitBreaker
from keel.llm.resilience.deadline import AttemptTimeouts, DeadlineModel
from keel.llm.resilience.fallback import FallbackModel, Link
from keel.llm.resilience.instrument import InstrumentedModel
from keel.llm.resilience.limit import ConcurrencyLimit
from keel.llm.resilience.retry import RetryModel
from keel.llm.resilience.shared import SharedBreakers
from keel.llm.trace import LLMObserver
from keel.settings import ModelConfig, Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

ProviderFactory = Callable[[str, ModelConfig], ChatModel]  # (alias, the deployment's config) → provider


@dataclass(slots=True)
class ModelStacks:
    models: dict[str, ChatModel]  # alias → its whole stack
    providers: list[ChatModel] = field(default_factory=list)
    providers_by_alias: dict[str, list[ChatModel]] = field(default_factory=dict)  # the bare providers
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)  # by deployment name
    shared: SharedBreakers | None = None

    async def start(self) -> None:
        for provider in self.providers:
            start = getattr(provider, "start", None)
            if start is not None:
                await start()
        if self.shared is not None:
            await self.shared.start()

    async def aclose(self) -> None:
        if self.shared is not None:
            await self.shared.aclose()
        for provider in self.providers:
            await provider.aclose()


def build_stacks(
    settings: Settings,
    make_provider: ProviderFactory,
    *,
    observer: LLMObserver,
    redis: Redis | None = None,
) -> ModelStacks:
    stacks = ModelStacks(models={})
    retrying: dict[str, ChatModel] = {}
    for alias, config in settings.models.items():
        deployments = []
        for name, deployment, resolved in config.deployment_configs(alias):
            provider = make_provider(alias, resolved)
            stacks.providers.append(provider)
            stacks.providers_by_alias.setdefault(alias, []).append(provider)
            upstream = resolved.model or alias
            model: ChatModel = AttemptTimeouts(
                provider,
                model=upstream,
                first_token=config.first_token_timeout,
                idle=config.stream_idle_timeout,
            )
            model = InstrumentedModel(
                model, alias=alias, deployment=name, upstream_model=upstream, observer=observer
            )
            limit = None
            max_concurrent = deployment.max_concurrent or config.max_concurrent
            if max_concurrent is not None:
                model = limit = ConcurrencyLimit(model, max_concurrent, name=name)
            breaker = None
            # Not for a local worker: its supervisor knows the moment it is back (a breaker would keep it
            # shut for a cooldown), and with Redis one replica's worker would shut every replica's.
            if config.breaker.enabled and config.provider != "local":
                breaker = stacks.breakers[name] = CircuitBreaker(name, config.breaker, observer)
                model = BreakerModel(model, breaker)
            deployments.append(Deployment(name, model, deployment.weight, breaker, limit))
        retrying[alias] = RetryModel(
            Balancer(alias, deployments), config.retry, alias=alias, observer=observer
        )
    for alias, config in settings.models.items():
        chain = [Link(alias, retrying[alias], config.context_window)]
        for name in dict.fromkeys(config.fallbacks):
            chain.append(Link(name, retrying[name], settings.models[name].context_window))
        stacks.models[alias] = DeadlineModel(FallbackModel(chain, observer=observer), config.timeout)
    if redis is not None and stacks.breakers:
        stacks.shared = SharedBreakers(
            redis, list(stacks.breakers.values()), interval=settings.breaker_sync_seconds
        )
    return stacks
