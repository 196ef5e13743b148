"""Model aliases from settings, each built once into a ChatModel: its providers inside the resilience
stack (retries, fallbacks, breakers, deadlines) that `keel.llm.resilience.build_stacks` composes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keel.errors import NotFoundError
from keel.llm.base import ChatModel
from keel.llm.http import HttpClient
from keel.llm.resilience import ModelStacks, build_stacks
from keel.llm.trace import LLMObserver, NoObserver
from keel.settings import ModelConfig, Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    alias: str
    provider: str
    upstream_model: str


class ModelRegistry:
    def __init__(
        self,
        settings: Settings,
        client: HttpClient,
        observer: LLMObserver = NoObserver(),
        redis: Redis | None = None,
    ) -> None:
        self._configs = settings.models
        self.stacks: ModelStacks = build_stacks(
            settings,
            lambda alias, config: build_model(alias, config, settings, client),
            observer=observer,
            redis=redis,
        )
        self._models: dict[str, ChatModel] = self.stacks.models

    def get(self, alias: str) -> ChatModel:
        try:
            return self._models[alias]
        except KeyError:
            raise NotFoundError(
                f"The model {alias!r} does not exist. Available: {', '.join(sorted(self._models))}.",
                param="model",
                code="model_not_found",
            ) from None

    def providers(self, alias: str) -> list[ChatModel]:
        """The bare providers behind an alias (one per deployment), without the resilience wrappers."""
        self.get(alias)  # unknown alias: the same 404
        return self.stacks.providers_by_alias.get(alias, [])

    def info(self) -> list[ModelInfo]:
        return [
            ModelInfo(alias, config.provider, config.model or alias)
            for alias, config in self._configs.items()
        ]

    async def start(self) -> None:
        await self.stacks.start()

    async def aclose(self) -> None:
        await self.stacks.aclose()


def build_model(alias: str, config: ModelConfig, settings: Settings, client: HttpClient) -> ChatModel:
    if config.provider == "openai":
        from keel.llm.openai_compat import OpenAIChatModel

        return OpenAIChatModel(alias, config, client)
    if config.provider == "anthropic":
        from keel.llm.anthropic import AnthropicChatModel

        return AnthropicChatModel(alias, config, client)
    from keel.llm.local import LocalChatModel

    return LocalChatModel(alias, config, settings.local, client)
