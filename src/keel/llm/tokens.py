"""Token counting per model alias (docs/context.md, "Counting tokens").

    alias's provider / upstream model        counter                                  name
    local (a GGUF)                           its own vocabulary and chat template     local:<gguf file>
    openai, a model tiktoken maps to o200k   o200k_base, OpenAI's message overhead    tiktoken:o200k_base
    openai, a model tiktoken maps to cl100k  cl100k_base, the same overhead           tiktoken:cl100k_base
    anthropic, any other model               o200k × the alias's learned factor       estimate:o200k_base

`TokenCounters` is built once from the settings; `for_alias` is a dict lookup, and aliases on the same
tokenizer share one counter. Tokenizers load on first use; `preload()` (blocking: call it off the event
loop) loads every one the aliases need.
"""

from __future__ import annotations

import importlib.util
import logging

from tiktoken.model import encoding_name_for_model

from keel.llm.local_engine import model_file
from keel.llm.tokens_base import Message, Overhead, TokenCounter
from keel.llm.tokens_bpe import BpeFileError, build_encoding
from keel.llm.tokens_factors import TokenFactors, starting_factor
from keel.llm.tokens_local import LocalTokenCounter
from keel.llm.tokens_openai import EstimateCounter, TiktokenCounter, estimate_base
from keel.settings import ModelConfig, Settings

__all__ = [
    "BpeFileError",
    "EstimateCounter",
    "LocalTokenCounter",
    "Message",
    "Overhead",
    "TiktokenCounter",
    "TokenCounter",
    "TokenCounters",
    "TokenFactors",
    "build_encoding",
    "encoding_for_model",
    "starting_factor",
]

log = logging.getLogger(__name__)

SHIPPED = ("o200k_base", "cl100k_base")


def encoding_for_model(model: str) -> str | None:
    """The shipped encoding of an OpenAI model id (also "openai/gpt-4o"), or None."""
    for name in (model, model.rsplit("/", 1)[-1]):
        try:
            found = encoding_name_for_model(name)
        except KeyError:
            continue
        return found if found in SHIPPED else None
    return None


class TokenCounters:
    """One `TokenCounter` per configured alias, chosen by provider and upstream model name."""

    def __init__(self, settings: Settings, factors: TokenFactors | None = None) -> None:
        self.factors = factors if factors is not None else TokenFactors.from_settings(settings)
        self._tiktoken: dict[str, TiktokenCounter] = {}
        self._local: dict[str, LocalTokenCounter] = {}
        self._estimate_base = estimate_base()
        self._by_alias: dict[str, TokenCounter] = {
            alias: self._counter(alias, config, settings) for alias, config in settings.models.items()
        }

    def for_alias(self, alias: str) -> TokenCounter:
        """The counter of a configured alias; KeyError for any other."""
        return self._by_alias[alias]

    def __contains__(self, alias: object) -> bool:
        return alias in self._by_alias

    def preload(self) -> None:
        """Load every tokenizer the aliases use (blocking, under a second: run it off the event loop at
        start). A GGUF whose vocabulary or chat template cannot be used is estimated instead, logged."""
        for alias, counter in self._by_alias.items():
            try:
                counter.overhead  # noqa: B018 - loads the tokenizer
            except (ValueError, RuntimeError, OSError) as exc:
                if not isinstance(counter, LocalTokenCounter):
                    raise
                log.warning(
                    "model %r: cannot count with %s (%s); its tokens are estimated", alias, counter.path, exc
                )
                self._by_alias[alias] = EstimateCounter(alias, self._estimate_base, self.factors)

    def close(self) -> None:
        for local in self._local.values():
            local.close()

    def _counter(self, alias: str, config: ModelConfig, settings: Settings) -> TokenCounter:
        if config.provider == "local":
            path = model_file(config, settings.local)
            if path is not None and path.is_file() and importlib.util.find_spec("llama_cpp") is not None:
                key = str(path.resolve())
                if key not in self._local:
                    self._local[key] = LocalTokenCounter(path)
                return self._local[key]
            log.warning("model %r: no local model file or llama.cpp; its tokens are estimated", alias)
        elif config.provider == "openai":
            names = [config.model or alias, *(d.model for d in config.deployments if d.model)]
            encoding = next((e for e in map(encoding_for_model, names) if e is not None), None)
            if encoding is not None:
                if encoding not in self._tiktoken:
                    self._tiktoken[encoding] = TiktokenCounter(encoding)
                return self._tiktoken[encoding]
        return EstimateCounter(alias, self._estimate_base, self.factors)
