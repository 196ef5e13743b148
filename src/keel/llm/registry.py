"""Model aliases from settings, each built once into a ChatModel."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp

from keel.errors import NotFoundError
from keel.llm.base import ChatModel
from keel.settings import ModelConfig, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    alias: str
    provider: str
    upstream_model: str


class ModelRegistry:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._configs = settings.models
        self._models: dict[str, ChatModel] = {
            alias: build_model(alias, config, settings, session) for alias, config in settings.models.items()
        }

    def get(self, alias: str) -> ChatModel:
        try:
            return self._models[alias]
        except KeyError:
            raise NotFoundError(
                f"The model {alias!r} does not exist. Available: {', '.join(sorted(self._models))}.",
                param="model",
                code="model_not_found",
            ) from None

    def info(self) -> list[ModelInfo]:
        return [
            ModelInfo(alias, config.provider, config.model or alias)
            for alias, config in self._configs.items()
        ]

    async def start(self) -> None:
        for model in self._models.values():
            start = getattr(model, "start", None)
            if start is not None:
                await start()

    async def aclose(self) -> None:
        for model in self._models.values():
            await model.aclose()


def build_model(
    alias: str, config: ModelConfig, settings: Settings, session: aiohttp.ClientSession
) -> ChatModel:
    if config.provider == "openai":
        from keel.llm.openai_compat import OpenAIChatModel

        return OpenAIChatModel(alias, config, session)
    if config.provider == "anthropic":
        from keel.llm.anthropic import AnthropicChatModel

        return AnthropicChatModel(alias, config, session)
    from keel.llm.local import LocalChatModel

    return LocalChatModel(alias, config, settings.local)
