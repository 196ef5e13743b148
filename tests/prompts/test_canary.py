"""Canaries: a small share of a label goes to a new version; `status` shows per-variant numbers; the guard
pauses a canary that fails more than its baseline (fault-injecting upstream), and records why."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from keel.prompts.canary import judge
from keel.prompts.stats import VariantStats, two_sided_p, worse_beyond_margin
from keel.settings import BreakerConfig, ModelConfig, PromptSettings, RetryConfig
from keel.testing import FakeUpstream, Reply
from keel.testing.server import KeelServer


@pytest.fixture
def broken() -> Iterator[FakeUpstream]:
    """An upstream that fails every call: the canary version's model alias points at it."""
    with FakeUpstream() as upstream:
        upstream.default_reply = Reply(status=500, error_message="injected fault")
        yield upstream


def _alias(base_url: str) -> ModelConfig:
    # One attempt and no breaker: each request's outcome is the upstream's, nothing smoothed over.
    return ModelConfig(
        provider="openai",
        base_url=base_url,
        model="fake-gpt",
        retry=RetryConfig(attempts=1, wait=False),
        breaker=BreakerConfig(enabled=False),
    )


def test_a_failing_canary_pauses_itself_and_records_the_numbers(
    start_keel: Callable[..., KeelServer],
    fake: FakeUpstream,
    broken: FakeUpstream,
    make_tenant: Any,
    make_admin: Any,
    spec: Any,
    prompt_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_keel(
        models={"fake": _alias(fake.openai_base_url), "flaky": _alias(broken.openai_base_url)},
        prompts=PromptSettings(canary_check_seconds=0.2, canary_min_requests=15),
    )
    tenant = make_tenant()
    admin = make_admin(server, tenant.admin_key)
    admin.push(spec(prompt_name, template="Stable {{ company }}.", labels=["production"]))
    admin.push(spec(prompt_name, template="New {{ company }}.", model={"alias": "flaky"}))
    canary = admin.call(
        "POST", f"/prompts/{prompt_name}/canary", expect=201, json={"version": 2, "percent": 30}
    )
    assert canary["weights"] == {"1": 70, "2": 30}
    assert (canary["kind"], canary["status"], canary["candidate"]) == ("canary", "running", 2)

    chat = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {tenant.chat_key}"})
    prompt = {"name": prompt_name, "variables": {"company": "Acme"}}
    outcomes: list[int] = []
    deadline = time.monotonic() + 30
    status = canary
    while status["status"] == "running":
        assert time.monotonic() < deadline, "the canary was never paused"
        for _ in range(10):  # no model named: the version's alias decides where the call goes
            body = {
                "messages": [{"role": "user", "content": "hi"}],
                "user": uuid.uuid4().hex,
                "prompt": prompt,
            }
            outcomes.append(chat.post("/chat/completions", json=body).status_code)
        time.sleep(0.05)
        status = admin.call("GET", f"/prompts/{prompt_name}/canary")["experiment"]
    assert set(outcomes) == {200, 502}

    report = admin.call("GET", f"/prompts/{prompt_name}/canary")
    assert report["experiment"]["status"] == "paused"
    assert report["experiment"]["weights"] == {"1": 100, "2": 0}
    baseline, new = report["variants"]
    assert (baseline["variant"], new["variant"]) == ("baseline", "canary")
    assert new["requests"] >= 15 and new["error_rate"] == 1.0
    assert baseline["requests"] >= 15 and baseline["error_rate"] == 0.0
    assert baseline["p50_ms"] > 0 and baseline["p99_ms"] >= baseline["p50_ms"]
    assert baseline["mean_output_tokens"] > 0 and new["mean_output_tokens"] is None  # nothing answered
    assert new["tests"]["error_rate_significant"] is True

    pause = [e for e in report["events"] if e["event"] == "paused"]
    assert len(pause) == 1
    details = pause[0]["details"]
    assert details["metric"] == "error_rate"
    assert details["canary"]["rate"] == 1.0 and details["canary"]["requests"] >= 15
    assert details["baseline"]["rate"] == 0.0
    assert details["p_value"] < details["alpha"] == 0.01
    assert pause[0]["author"] == "keel:auto-pause"
    logged = [r for r in caplog.records if r.name == "keel.prompts.canary" and "paused" in r.getMessage()]
    assert len(logged) == 1
    assert "error_rate" in logged[0].getMessage() and "'rate': 1.0" in logged[0].getMessage()

    for _ in range(20):  # paused: every unit is back on the baseline
        body = {"messages": [{"role": "user", "content": "hi"}], "user": uuid.uuid4().hex, "prompt": prompt}
        assert chat.post("/chat/completions", json=body).status_code == 200
    chat.close()

    # The operator decides: abort it (or resume it with new weights, or promote it regardless).
    assert admin.call("POST", f"/prompts/{prompt_name}/canary/abort", json={})["status"] == "aborted"
    admin.call("POST", f"/prompts/{prompt_name}/canary/abort", expect=404, json={})


def test_canary_promote_moves_the_label_and_ends_the_canary(admin: Any, spec: Any, prompt_name: str) -> None:
    admin.push(spec(prompt_name, template="One {{ company }}", labels=["production"]))
    admin.push(spec(prompt_name, template="Two {{ company }}"))
    refused = admin.call(
        "POST", f"/prompts/{prompt_name}/canary", expect=400, json={"version": 1, "percent": 5}
    )
    assert refused["error"]["param"] == "version"  # the label's own version is no canary
    admin.call("POST", f"/prompts/{prompt_name}/canary", expect=400, json={"version": 2, "percent": 0})
    admin.call("POST", f"/prompts/{prompt_name}/canary", expect=201, json={"version": 2, "percent": 5})
    moved = admin.call("POST", f"/prompts/{prompt_name}/canary/promote", json={"reason": "looks good"})
    assert (moved["from"], moved["to"], moved["reason"]) == (1, 2, "looks good")
    report = admin.call("GET", f"/prompts/{prompt_name}/canary")
    assert report["experiment"]["status"] == "promoted"
    assert [e["event"] for e in report["events"]] == ["started", "promoted"]


def _arm(version: int, requests: int, errors: int, feedback: int = 0, negative: int = 0) -> VariantStats:
    return VariantStats(version, "x", requests=requests, errors=errors, feedback=feedback, negative=negative)


def test_the_guard_waits_for_a_minimum_sample_and_tolerates_the_margin() -> None:
    settings = PromptSettings(canary_min_requests=100, canary_min_feedback=50)
    # Clearly worse, but too few canary requests to judge yet.
    assert judge(_arm(1, 2000, 10), _arm(2, 60, 30), settings) is None
    # Clearly worse with enough requests: pause, with the numbers.
    verdict = judge(_arm(1, 2000, 10), _arm(2, 120, 30), settings)
    assert verdict is not None and verdict["metric"] == "error_rate"
    assert verdict["canary"] == {"version": 2, "errors": 30, "requests": 120, "rate": 0.25}
    # Within the 2-point margin: no pause, however many requests.
    assert judge(_arm(1, 100_000, 1000), _arm(2, 20_000, 250), settings) is None
    # Noise at small rates is no evidence: 3/200 against 2/200.
    assert judge(_arm(1, 200, 2), _arm(2, 200, 3), settings) is None
    # Negative feedback counts on its own.
    verdict = judge(_arm(1, 2000, 0, 400, 40), _arm(2, 150, 0, 60, 30), settings)
    assert verdict is not None and verdict["metric"] == "negative_feedback_rate"


def test_the_tests_are_the_stated_ones() -> None:
    # Pooled two-proportion z: 30/100 vs 10/100 gives z = 0.2 / sqrt(0.2 * 0.8 * 0.02) = 3.536.
    assert two_sided_p(30, 100, 10, 100) == pytest.approx(0.000407, rel=0.01)
    assert two_sided_p(10, 100, 10, 100) == pytest.approx(1.0)
    # Against a margin the same difference is less surprising, and equal rates are not worse at all.
    assert worse_beyond_margin(30, 100, 10, 100, 0.0) < worse_beyond_margin(30, 100, 10, 100, 0.1) < 0.05
    assert worse_beyond_margin(10, 100, 10, 100, 0.02) > 0.5
