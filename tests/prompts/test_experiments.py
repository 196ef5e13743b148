"""Experiments: deterministic, sticky assignment per unit; the observed split matches the weights; changing
weights moves only the units that must move; over HTTP, a user keeps their variant."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import openai
import pytest

from keel.prompts.experiments import Experiment, allocate


def _experiment(weights: dict[int, int], slots: list[int] | None = None) -> Experiment:
    table = slots if slots is not None else allocate(weights)
    return Experiment(uuid.uuid4(), "experiment", "user", "running", tuple(table), min(weights), None)


@pytest.mark.parametrize("weights", [{4: 50, 5: 50}, {1: 95, 2: 5}, {1: 20, 2: 30, 3: 50}])
def test_the_observed_split_is_within_two_points_of_the_weights(weights: dict[int, int]) -> None:
    experiment = _experiment(weights)
    units = [f"user:{n}" for n in range(10_000)]
    seen = Counter(experiment.assign(unit) for unit in units)
    for version, weight in weights.items():
        assert abs(seen[version] / 100 - weight) <= 2, (version, seen)
    assert [experiment.assign(unit) for unit in units[:500]] == [experiment.assign(u) for u in units[:500]]


def test_another_experiment_shuffles_units_independently() -> None:
    units = [f"user:{n}" for n in range(2_000)]
    first, second = _experiment({1: 50, 2: 50}), _experiment({1: 50, 2: 50})
    same = sum(first.assign(u) == second.assign(u) for u in units)
    assert 0.4 < same / len(units) < 0.6  # independent hashes, not the same half every time


def test_changing_weights_moves_only_the_units_that_must_move() -> None:
    units = [f"user:{n}" for n in range(10_000)]
    before = _experiment({4: 50, 5: 50})
    after = Experiment(
        before.id,
        "experiment",
        "user",
        "running",
        tuple(allocate({4: 40, 5: 60}, list(before.slots))),
        4,
        None,
    )
    moves = Counter((before.assign(u), after.assign(u)) for u in units if before.assign(u) != after.assign(u))
    assert set(moves) == {(4, 5)}  # nobody on 5 moves to 4
    assert abs(moves[(4, 5)] / 100 - 10) <= 2  # about the 10 points that changed hands

    three = allocate({1: 34, 2: 33, 3: 33})
    reweighed = allocate({1: 20, 2: 47, 3: 33}, three)
    changed = Counter((a, b) for a, b in zip(three, reweighed, strict=True) if a != b)
    assert changed == Counter({(1, 2): 14})  # 3's slots untouched; exactly 14 slots from 1 to 2
    # Growing the first and shrinking the last leaves the middle alone (a fresh table would shift it).
    shifted = allocate({1: 54, 2: 33, 3: 13}, three)
    changed = Counter((a, b) for a, b in zip(three, shifted, strict=True) if a != b)
    assert changed == Counter({(3, 1): 20})

    paused = allocate({1: 100, 2: 0}, allocate({1: 95, 2: 5}))
    assert paused == [1] * 100

    with pytest.raises(ValueError, match="sum to 100"):
        allocate({1: 50, 2: 40})


def test_a_user_keeps_their_variant_and_the_audit_record_names_it(
    admin: Any, spec: Any, prompt_name: str, client: openai.OpenAI, fake: Any
) -> None:
    admin.push(spec(prompt_name, template="A {{ company }}", labels=["production"]))
    admin.push(spec(prompt_name, template="B {{ company }}"))
    started = admin.call(
        "POST",
        f"/prompts/{prompt_name}/experiments",
        expect=201,
        json={"label": "production", "weights": {"1": 50, "2": 50}, "unit": "user"},
    )
    assert started["weights"] == {"1": 50, "2": 50}
    seen: dict[str, set[str]] = {}
    request_ids: dict[str, str] = {}
    for round_ in range(2):
        for n in range(16):
            user = f"user-{n}"
            request_id = f"req-{uuid.uuid4().hex[:10]}"
            client.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hi"}],
                user=user,
                extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
                extra_headers={"X-Request-ID": request_id},
            )
            seen.setdefault(user, set()).add(fake.requests[-1].body["messages"][0]["content"])
            if round_ == 0:
                request_ids[user] = request_id
    assert all(len(variants) == 1 for variants in seen.values()), seen  # sticky
    assert {next(iter(v)) for v in seen.values()} == {"A Acme", "B Acme"}  # both arms in use

    user, request_id = next(iter(request_ids.items()))
    record = admin.record(request_id)["prompt"]
    assert record["experiment"] == started["id"]
    assert record["variant"] == f"v{record['version']}"
    assert next(iter(seen[user])) == ("A Acme" if record["version"] == 1 else "B Acme")

    status = admin.call("GET", f"/prompts/{prompt_name}/experiments/production")
    assert status["experiment"]["status"] == "running"
    assert [v["version"] for v in status["variants"]] == [1, 2]

    bad = admin.call(
        "PATCH",
        f"/prompts/{prompt_name}/experiments/production",
        expect=400,
        json={"weights": {"1": 70, "2": 20}},
    )
    assert "100" in bad["error"]["message"]
    admin.call(
        "POST", f"/prompts/{prompt_name}/experiments", expect=400, json={"weights": {"1": 50, "2": 50}}
    )

    # Moving the label ends the experiment: everyone gets the label's version again.
    admin.move(prompt_name, "production", 2)
    ended = admin.call("GET", f"/prompts/{prompt_name}/experiments/production")["experiment"]
    assert ended["status"] == "ended"
    for n in range(6):
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            user=f"user-{n}",
            extra_body={"prompt": {"name": prompt_name, "variables": {"company": "Acme"}}},
        )
        assert fake.requests[-1].body["messages"][0]["content"] == "B Acme"
