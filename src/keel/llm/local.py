"""Provider "local": SmolLM2-135M-Instruct (or any chat GGUF) on llama.cpp, in a worker process of its own.

The gateway never loads llama.cpp: `keel.llm.local_process` runs the model in a supervised child process
(`keel.llm.local_server`) and this provider streams from it over loopback HTTP. A crash in native code
ends one stream with an error and makes this alias answer 503 (or fall back) until the worker is back;
every other alias keeps serving. Token counts stay exact (the worker counts with the model's own
tokenizer) and a closed stream stops its generation within one token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from keel.errors import InvalidRequestError, UpstreamError, UpstreamTimeoutError, UpstreamUnavailableError
from keel.llm.events import ChatEvent, ChatRequest, Finish
from keel.llm.http import HttpClient
from keel.llm.local_engine import BUNDLED_DISTRIBUTION, BUNDLED_GGUF, INSTALL_HINT, bundled_gguf, model_file
from keel.llm.local_process import WorkerProcess
from keel.llm.local_wire import parse_event, request_body
from keel.llm.sse import post_sse
from keel.settings import LocalModelSettings, ModelConfig

__all__ = [
    "BUNDLED_DISTRIBUTION",
    "BUNDLED_GGUF",
    "INSTALL_HINT",
    "LocalChatModel",
    "bundled_gguf",
    "model_file",
]

CONNECT_TIMEOUT = 5.0  # loopback: a worker that does not accept within this is not there


class LocalChatModel:
    provider = "local"

    def __init__(
        self, alias: str, config: ModelConfig, local: LocalModelSettings, client: HttpClient | None = None
    ) -> None:
        self.alias = alias
        self._config = config
        self._model_name = config.model or alias
        self._worker = WorkerProcess(alias, config, local)
        self._own_client = client is None
        self._client = client if client is not None else HttpClient(keepalive=30)
        self._headers = {"Authorization": f"Bearer {self._worker.token}", "Content-Type": "application/json"}

    def supports_tools(self) -> bool:
        return False

    @property
    def loaded(self) -> bool:
        """For readiness: False while the worker is starting, restarting, or cannot load the model."""
        return self._worker.port is not None

    @property
    def unavailable_reason(self) -> str:
        return self._worker.down_reason

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid

    @property
    def worker_starts(self) -> int:
        return self._worker.starts

    async def start(self) -> None:
        await self._worker.start()

    async def aclose(self) -> None:
        await self._worker.aclose()
        if self._own_client:
            await self._client.aclose()

    async def load(self) -> dict[str, Any]:
        """The worker's own count of requests generating and waiting for an instance."""
        response = await self._client.request(
            "GET", self._url("/health"), headers=self._headers, total=5, connect_timeout=CONNECT_TIMEOUT
        )
        body: dict[str, Any] = orjson.loads(await response.read())
        return body

    def _url(self, path: str) -> str:
        port = self._worker.port
        if port is None:
            raise UpstreamUnavailableError(
                f"local model {self.alias!r} is unavailable: {self._worker.down_reason}",
                provider=self.provider,
                model=self._model_name,
                headers={"Retry-After": "1"},
            )
        return f"http://127.0.0.1:{port}{path}"

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        if request.tools:
            raise InvalidRequestError(
                f"model {self.alias!r} (local) does not support tools",
                param="tools",
                code="tools_not_supported",
            )
        events = post_sse(
            self._client,
            self._url("/generate"),
            body=request_body(request),
            headers=self._headers,
            total=self._config.timeout,
            connect_timeout=CONNECT_TIMEOUT,
            provider=self.provider,
            model=self._model_name,
            secret=self._worker.token,
        )
        finished = False
        async with aclosing(events):
            while True:
                try:
                    sse = await anext(events)
                except StopAsyncIteration:
                    break
                except UpstreamTimeoutError:
                    raise
                except UpstreamError as exc:  # the connection broke: the worker died or is shutting down
                    raise self._lost(exc) from exc
                event = parse_event(sse.data, model=self._model_name)
                finished = isinstance(event, Finish)
                yield event
        if not finished:
            raise self._lost(None)

    def _lost(self, cause: UpstreamError | None) -> UpstreamUnavailableError:
        if self._worker.closing:
            what = "local model is shutting down"
        else:
            what = f"local model {self.alias!r} stopped mid-answer (its worker process is restarting)"
            if cause is not None:
                what += f": {cause.message}"
        return UpstreamUnavailableError(what, provider=self.provider, model=self._model_name)
