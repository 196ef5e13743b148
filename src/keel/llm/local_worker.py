"""One generation on one llama instance in a worker thread; events reach the event loop as they come."""

from __future__ import annotations

import asyncio
import codecs
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.errors import UpstreamError
from keel.llm.events import ChatEvent, Finish, TextDelta, Usage

if TYPE_CHECKING:
    from llama_cpp import Llama

# llama.cpp's own defaults, for a request that sets none (temperature 0 is greedy).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95

Emit = Callable[[ChatEvent | Exception], None]


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, kept in a set of running jobs
class Generation:
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Any], job: Generation) -> Emit:
    def emit(item: ChatEvent | Exception) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            job.cancelled.set()

    return emit


class StopScanner:
    """Holds back text that may start a stop sequence, so that a stop sequence never reaches the client."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text safe to send now, and whether a stop sequence was hit."""
        pending = self._pending + text
        hits = [index for stop in self._stops if (index := pending.find(stop)) >= 0]
        if hits:
            self._pending = ""
            return pending[: min(hits)], True
        hold = max(
            (n for stop in self._stops for n in range(len(stop) - 1, 0, -1) if pending.endswith(stop[:n])),
            default=0,
        )
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending


def run_generation(llama: Llama, job: Generation, emit: Emit, *, model: str) -> None:
    """Sample until end of turn, a stop sequence, max_tokens or cancellation; emit deltas, Usage, Finish."""
    try:
        output_tokens, reason = generate(llama, job, emit)
    except Exception as exc:  # llama.cpp failures reach the client as an upstream error, not a silent hang
        emit(UpstreamError(f"local model failed: {exc}", provider="local", model=model))
        return
    if job.cancelled.is_set():
        return
    emit(Usage(input_tokens=len(job.prompt_tokens), output_tokens=output_tokens))
    emit(Finish(reason))


def generate(llama: Llama, job: Generation, emit: Emit) -> tuple[int, str]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    scanner = StopScanner(job.stop)
    temperature = job.temperature if job.temperature is not None else DEFAULT_TEMPERATURE
    top_p = job.top_p if job.top_p is not None else DEFAULT_TOP_P
    llama.set_seed(job.seed if job.seed is not None else random.getrandbits(31))

    output_tokens, reason = 0, "length"
    for token in llama.generate(job.prompt_tokens, temp=temperature, top_p=top_p):
        # Checked between tokens: a closed stream frees this worker within one token's time.
        if job.cancelled.is_set():
            return output_tokens, "stop"
        output_tokens += 1  # every sampled token counts, the end-of-turn token included
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            reason = "stop"
            break
        text, hit = scanner.push(decoder.decode(bytes(llama.detokenize([token]))))
        if text:
            emit(TextDelta(text))
        if hit:
            return output_tokens, "stop"
        if output_tokens >= job.max_tokens:
            break
    tail = scanner.flush() + decoder.decode(b"", final=True)
    if tail:
        emit(TextDelta(tail))
    return output_tokens, reason
