"""The local model in its worker process against the same model in this process: TTFT and tokens/s.

    .venv/bin/python bench/local_model.py [--runs 10] [--max-tokens 200]

Both sides run the same generation code (`keel.llm.local_engine`) on the same GGUF with the same request
(temperature 0); the worker adds its process, loopback HTTP and the event stream. Results are in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from keel.llm.events import ChatEvent, ChatRequest, TextDelta, Usage
from keel.llm.local import LocalChatModel
from keel.llm.local_engine import LocalEngine
from keel.settings import LocalModelSettings, ModelConfig

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def one(model: LocalEngine | LocalChatModel, max_tokens: int) -> tuple[float, float]:
    """(time to first token in ms, tokens/s after the first token)"""
    request = ChatRequest(model="local", messages=PROMPT, max_tokens=max_tokens, temperature=0)
    began = time.perf_counter()
    first = 0.0
    tokens = 0
    event: ChatEvent
    async for event in model.stream(request):
        if isinstance(event, TextDelta) and not first:
            first = time.perf_counter()
        elif isinstance(event, Usage):
            tokens = event.output_tokens
    ended = time.perf_counter()
    return (first - began) * 1000, (tokens - 1) / (ended - first)


async def measure(name: str, model: LocalEngine | LocalChatModel, runs: int, max_tokens: int) -> None:
    await model.start()
    try:
        await one(model, 8)  # warm up
        results = [await one(model, max_tokens) for _ in range(runs)]
    finally:
        await model.aclose()
    ttft = [r[0] for r in results]
    rate = [r[1] for r in results]
    print(
        f"{name:<11} TTFT p50 {statistics.median(ttft):6.1f} ms (min {min(ttft):5.1f})   "
        f"tokens/s p50 {statistics.median(rate):6.1f} (max {max(rate):5.1f})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two sides this many times")
    args = parser.parse_args()
    config, local = ModelConfig(provider="local"), LocalModelSettings()
    for _ in range(args.rounds):
        await measure("in-process", LocalEngine("local", config, local), args.runs, args.max_tokens)
        await measure("worker", LocalChatModel("local", config, local), args.runs, args.max_tokens)


if __name__ == "__main__":
    asyncio.run(main())
