"""The promotion gate: every move of the `production` label asks it first.

It allows everything until the evals issue fills it in (run a suite against the version, compare with
production). A refused promotion can be forced; the move is then recorded as forced, with its reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Promotion:
    tenant_id: uuid.UUID
    name: str
    version: int
    label: str
    author: str


@dataclass(frozen=True, slots=True)
class GateVerdict:
    allowed: bool
    reason: str = ""


class PromotionGate(Protocol):
    async def check(self, promotion: Promotion) -> GateVerdict: ...


class AllowAll:
    async def check(self, promotion: Promotion) -> GateVerdict:
        return GateVerdict(allowed=True, reason="no gate configured")
