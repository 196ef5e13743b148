from __future__ import annotations

import pytest

from keel.errors import RateLimitError
from keel.llm import ChatRequest, ChatResult
from keel.ratelimit import InMemoryRateLimiter, Lease, RateLimiter, RateLimitState, estimate_usage
from keel.settings import TierLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def tier(rpm: int = 1000, tpm: int = 1_000_000, concurrent: int = 100) -> TierLimits:
    return TierLimits(requests_per_minute=rpm, tokens_per_minute=tpm, concurrent_requests=concurrent)


async def take(limiter: RateLimiter, limits: TierLimits, tokens: int = 0, key: str = "t1") -> Lease:
    lease = await limiter.acquire(key, limits, tokens)
    await lease.release()  # keep concurrency out of tests about the buckets
    return lease


@pytest.mark.asyncio
async def test_exactly_rpm_requests_pass_then_the_next_is_refused(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=5)
    remaining = [(await take(limiter, limits)).state.remaining_requests for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    with pytest.raises(RateLimitError) as refused:
        await take(limiter, limits)
    assert refused.value.status == 429
    assert "requests per minute" in refused.value.message
    assert "limit 5" in refused.value.message
    assert refused.value.headers["Retry-After"] == "12"  # one request refills in 60/5 s
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.headers["x-ratelimit-reset-requests"] == "1m0s"


@pytest.mark.asyncio
async def test_keys_have_separate_budgets(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=1)
    await take(limiter, limits, key="a")
    await take(limiter, limits, key="b")
    with pytest.raises(RateLimitError):
        await take(limiter, limits, key="a")


@pytest.mark.asyncio
async def test_requests_refill_continuously(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=60)  # one a second
    for _ in range(60):
        await take(limiter, limits)
    clock.advance(0.5)
    with pytest.raises(RateLimitError) as refused:
        await take(limiter, limits)
    assert refused.value.headers["Retry-After"] == "1"
    clock.advance(0.5)
    await take(limiter, limits)
    with pytest.raises(RateLimitError):
        await take(limiter, limits)
    clock.advance(30)
    assert (await take(limiter, limits)).state.remaining_requests == 29
    clock.advance(3600)  # refill stops at capacity
    assert (await take(limiter, limits)).state.remaining_requests == 59


@pytest.mark.asyncio
async def test_tokens_are_charged_by_estimate(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(tpm=600)  # 10 tokens a second
    assert (await take(limiter, limits, 400)).state.remaining_tokens == 200
    with pytest.raises(RateLimitError) as refused:
        await take(limiter, limits, 250)
    message = refused.value.message
    assert "tokens per minute" in message
    assert "limit 600" in message
    assert "requested 250" in message
    assert refused.value.headers["Retry-After"] == "5"  # 50 tokens short at 10 a second
    clock.advance(5)
    assert (await take(limiter, limits, 250)).state.remaining_tokens == 0


@pytest.mark.asyncio
async def test_a_token_refusal_takes_no_request(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=10, tpm=100, concurrent=1)
    assert (await take(limiter, limits, 90)).state.remaining_requests == 9
    for _ in range(3):
        with pytest.raises(RateLimitError, match="tokens per minute"):
            await limiter.acquire("t1", limits, 50)
    lease = await limiter.acquire("t1", limits, 10)  # the refusals held no concurrency slot either
    assert lease.state.remaining_requests == 8
    assert lease.state.remaining_tokens == 0


@pytest.mark.asyncio
async def test_a_request_over_the_tpm_capacity_is_too_large_not_retried(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=10, tpm=100)
    with pytest.raises(RateLimitError) as refused:
        await take(limiter, limits, 101)
    assert refused.value.code == "request_too_large"
    assert "too large" in refused.value.message
    assert "limit 100" in refused.value.message
    assert "requested 101" in refused.value.message
    assert "Retry-After" not in refused.value.headers
    lease = await take(limiter, limits, 100)  # exactly the capacity passes, and nothing was taken
    assert (lease.state.remaining_requests, lease.state.remaining_tokens) == (9, 0)


@pytest.mark.asyncio
async def test_settle_charges_more_as_debt_that_delays_later_requests(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(tpm=600)  # 10 tokens a second
    lease = await limiter.acquire("t1", limits, 100)
    await lease.settle(700)  # 600 more than estimated: 100 in debt
    await lease.release()
    with pytest.raises(RateLimitError) as refused:
        await take(limiter, limits, 0)
    assert refused.value.headers["Retry-After"] == "10"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.value.headers["x-ratelimit-reset-tokens"] == "1m10s"
    clock.advance(10)
    assert (await take(limiter, limits, 0)).state.remaining_tokens == 0
    clock.advance(1)
    assert (await take(limiter, limits, 0)).state.remaining_tokens == 10


@pytest.mark.asyncio
async def test_settle_refunds_an_overestimate_once(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(tpm=1000)
    lease = await limiter.acquire("t1", limits, 800)
    await lease.settle(300)
    await lease.settle(0)  # a second settle changes nothing
    await lease.release()
    assert (await take(limiter, limits, 100)).state.remaining_tokens == 600


@pytest.mark.asyncio
async def test_refund_never_fills_past_capacity(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(tpm=1000)
    lease = await limiter.acquire("t1", limits, 800)
    clock.advance(3600)
    await lease.settle(0)
    await lease.release()
    assert (await take(limiter, limits, 1)).state.remaining_tokens == 999


@pytest.mark.asyncio
async def test_concurrency_slots_are_held_until_release(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(concurrent=2)
    first = await limiter.acquire("t1", limits, 0)
    second = await limiter.acquire("t1", limits, 0)
    with pytest.raises(RateLimitError) as refused:
        await limiter.acquire("t1", limits, 0)
    assert "concurrent requests" in refused.value.message
    assert "limit 2" in refused.value.message
    assert refused.value.headers["Retry-After"] == "1"
    await first.release()
    await first.release()  # idempotent: must not free the slot `second` or `third` holds
    third = await limiter.acquire("t1", limits, 0)
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("t1", limits, 0)
    await second.release()
    await third.release()
    await (await limiter.acquire("t1", limits, 0)).release()


@pytest.mark.asyncio
async def test_lease_state_and_headers(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=60, tpm=150_000)
    lease = await limiter.acquire("t1", limits, 30_000)
    assert lease.state == RateLimitState(
        limit_requests=60,
        remaining_requests=59,
        limit_tokens=150_000,
        remaining_tokens=120_000,
        reset_requests=1.0,
        reset_tokens=12.0,
    )
    assert lease.state.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "120000",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-reset-tokens": "12s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.12, "120ms"),
        (0.0001, "1ms"),  # rounded up: waiting that long is enough
        (0.999, "999ms"),
        (1.0, "1s"),
        (17.28, "17.28s"),
        (60.0, "1m0s"),
        (86.4, "1m26.4s"),
        (360.0, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_resets_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    state = RateLimitState(1, 0, 1, 0, reset_requests=seconds, reset_tokens=seconds)
    assert state.headers()["x-ratelimit-reset-requests"] == text
    assert state.headers()["x-ratelimit-reset-tokens"] == text


@pytest.mark.asyncio
async def test_idle_full_buckets_are_dropped_but_debts_are_kept(clock: FakeClock) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=60, tpm=600)
    debtor = await limiter.acquire("debtor", limits, 0)
    await debtor.settle(6000)  # ten minutes of tokens in debt
    await debtor.release()
    held = await limiter.acquire("holder", limits, 0)
    for round_ in range(5):
        for i in range(2000):
            await take(limiter, limits, key=f"r{round_}-k{i}")
        clock.advance(61)  # every bucket but the debtor's is full again
    assert limiter.tracked_keys < 5000
    with pytest.raises(RateLimitError, match="tokens per minute"):
        await take(limiter, limits, key="debtor")
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("holder", tier(rpm=60, tpm=600, concurrent=1), 0)
    await held.release()


@pytest.mark.asyncio
async def test_negative_counts_are_rejected(clock: FakeClock) -> None:
    limiter = InMemoryRateLimiter(clock)
    with pytest.raises(ValueError, match="estimated_tokens"):
        await limiter.acquire("t1", tier(), -1)
    lease = await limiter.acquire("t1", tier(), 1)
    with pytest.raises(ValueError, match="actual_tokens"):
        await lease.settle(-1)


@pytest.mark.asyncio
async def test_reserve_after_acquire_refuses_for_tokens_alone_and_end_always_releases(
    clock: FakeClock,
) -> None:
    limiter, limits = InMemoryRateLimiter(clock), tier(rpm=1, tpm=60, concurrent=1)
    lease = await limiter.acquire("t1", limits, 0)  # the last request of the minute, the only slot
    with pytest.raises(RateLimitError) as refused:
        await lease.reserve(61)
    assert refused.value.code == "request_too_large"
    await lease.reserve(30)
    with pytest.raises(RateLimitError) as refused:
        await lease.reserve(31)
    assert "tokens per minute" in refused.value.message
    assert "requests per minute" not in refused.value.message  # its own request and slot are no reason
    assert "concurrent" not in refused.value.message
    assert lease.state.remaining_tokens == 30
    await lease.end(45)  # 30 reserved, 45 used
    clock.advance(60)
    assert (await take(limiter, limits)).state.remaining_tokens == 60  # the slot came back, refilled


@pytest.mark.asyncio
async def test_pipeline_estimate_counts_prompt_tools_and_streamed_output() -> None:
    request = ChatRequest(
        model="m",
        messages=[
            {"role": "user", "content": "a" * 40},
            {"role": "assistant", "content": [{"text": "b" * 8}]},
        ],
        tools=[{"type": "function", "function": {"name": "f" * 100}}],
    )
    result = ChatResult(text="c" * 9, tool_calls=[{"function": {"name": "go", "arguments": "{}"}}])
    usage = estimate_usage(request, result)
    assert usage.output_tokens == 4  # 13 characters, rounded up
    assert usage.input_tokens > (40 + 8 + 100) // 4 + 2 * 4  # the tool definition's JSON counts too
