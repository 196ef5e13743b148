"""Sticky, weighted assignment of units (tenant, end user, conversation) to prompt versions.

A unit's hash of (experiment id, unit) picks one of 100 slots; each slot holds a version, so a version with
weight 30 holds 30 slots. Changing weights hands over only the slots that must change owner (a shrinking
version gives up its highest slots, a growing one takes them), so only the units that must move do.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Literal

SLOTS = 100
Unit = Literal["tenant", "user", "conversation"]
UNITS: tuple[Unit, ...] = ("tenant", "user", "conversation")


def check_weights(weights: dict[int, int]) -> dict[int, int]:
    if len(weights) < 2:
        raise ValueError("an experiment needs at least two versions")
    if any(weight < 0 for weight in weights.values()):
        raise ValueError("weights cannot be negative")
    if sum(weights.values()) != SLOTS:
        raise ValueError(f"weights must sum to 100, not {sum(weights.values())}")
    return dict(sorted(weights.items()))


def allocate(weights: dict[int, int], previous: list[int] | None = None) -> list[int]:
    """The slot table for `weights` that keeps as many of `previous`'s slots as possible."""
    weights = check_weights(weights)
    if previous is None:
        return [version for version, weight in weights.items() for _ in range(weight)]
    slots = list(previous)
    held = Counter(slots)
    free: list[int] = []
    for index in reversed(range(SLOTS)):  # surplus slots, highest first
        version = slots[index]
        if held[version] > weights.get(version, 0):
            held[version] -= 1
            free.append(index)
    free.sort()
    for version, weight in weights.items():
        while held[version] < weight:
            slots[free.pop(0)] = version
            held[version] += 1
    return slots


def weights_of(slots: list[int], versions: list[int] | None = None) -> dict[int, int]:
    held = Counter(slots)
    return {version: held.get(version, 0) for version in sorted(set(versions or []) | set(held))}


def slot_of(experiment_id: uuid.UUID, unit: str) -> int:
    digest = hashlib.blake2b(f"{experiment_id}:{unit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SLOTS


@dataclass(frozen=True, slots=True)
class Experiment:
    """A live split of one label: what the resolver needs, cached with the label."""

    id: uuid.UUID
    kind: str  # "experiment" | "canary"
    unit: Unit
    status: str  # "running" | "paused"
    slots: tuple[int, ...]
    baseline: int
    candidate: int | None

    def assign(self, unit: str) -> int:
        return self.slots[slot_of(self.id, unit)]

    def variant(self, version: int) -> str:
        return variant_name(self.kind, version, self.candidate)


def variant_name(kind: str, version: int, candidate: int | None) -> str:
    """How audit records and statistics call a version's arm: baseline/canary, or v5 in an experiment."""
    if kind == "canary":
        return "canary" if version == candidate else "baseline"
    return f"v{version}"
