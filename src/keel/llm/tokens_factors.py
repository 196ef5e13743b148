"""Per-alias factors that turn an o200k estimate into the tokens an upstream will count.

For an alias whose tokenizer Keel lacks (Anthropic, an unknown OpenAI-compatible model), the factor is
reported prompt_tokens / estimated o200k tokens, learned from every answer's usage and kept in the
`token_factors` table. It starts conservative (1.25 for Claude, 1.15 otherwise) and moves by an
asymmetric moving average: an observation above the factor pulls it up with weight RISE, one below pulls it
down with weight FALL. The fixed point of that rule is the RISE / (RISE + FALL) ≈ 0.91 expectile of the
observed ratios (the least-squares cousin of a quantile): above the mean by about one standard
deviation, so an estimate over-counts far more often than it under-counts. The table keeps the factor
itself, which is this rule's whole state, so a restart resumes exactly where it was.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from keel.db.tables import token_factors

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from keel.settings import Settings

DEFAULT_FACTOR = 1.15
CLAUDE_FACTOR = 1.25
RISE = 0.5  # weight of an observation above the factor
FALL = 0.05  # weight of an observation below it
MIN_ESTIMATE = 16  # a smaller request is mostly overhead: it says little about the tokenizer
RATIO_BOUNDS = (0.5, 3.0)  # a ratio outside is clipped (a misreported or tool-laden request)


@dataclass
class _Learned:
    factor: float
    samples: int  # observations in all, stored ones included
    unsaved: int = 0  # observations since the last flush


class TokenFactors:
    """The learned factor of every estimated alias: `load` at start, `observe` each reported usage,
    `flush` now and then (one upsert of the changed rows)."""

    def __init__(self, defaults: Mapping[str, float] | None = None) -> None:
        self._defaults = dict(defaults or {})
        self._learned: dict[str, _Learned] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenFactors:
        return cls(
            {
                alias: starting_factor(alias, config.model, config.provider)
                for alias, config in settings.models.items()
            }
        )

    def default(self, alias: str) -> float:
        found = self._defaults.get(alias)
        return found if found is not None else starting_factor(alias, None, None)

    def factor(self, alias: str) -> float:
        learned = self._learned.get(alias)
        return learned.factor if learned is not None else self.default(alias)

    def samples(self, alias: str) -> int:
        learned = self._learned.get(alias)
        return learned.samples if learned is not None else 0

    def observe(self, alias: str, estimated_tokens: int, reported_tokens: int) -> None:
        """One answer's usage: `estimated_tokens` is Keel's o200k count of exactly what was sent (the sum
        of the estimate counter's counts, before the factor), `reported_tokens` the upstream's
        prompt_tokens. Requests with tool definitions, which Keel does not count, should not be observed."""
        if estimated_tokens < MIN_ESTIMATE or reported_tokens <= 0:
            return
        low, high = RATIO_BOUNDS
        ratio = min(max(reported_tokens / estimated_tokens, low), high)
        with self._lock:
            learned = self._learned.get(alias)
            if learned is None:
                learned = self._learned[alias] = _Learned(self.default(alias), 0)
            weight = RISE if ratio > learned.factor else FALL
            learned.factor += weight * (ratio - learned.factor)
            learned.samples += 1
            learned.unsaved += 1

    async def load(self, engine: AsyncEngine) -> int:
        """Read every stored factor; returns how many."""
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(token_factors.c.alias, token_factors.c.factor, token_factors.c.samples)
                )
            ).all()
        with self._lock:
            for alias, factor, samples in rows:
                learned = self._learned.get(alias)
                unsaved = learned.unsaved if learned is not None else 0
                self._learned[alias] = _Learned(float(factor), int(samples) + unsaved, unsaved)
        return len(rows)

    async def flush(self, engine: AsyncEngine) -> int:
        """Upsert the factors that moved since the last flush, in one statement; returns how many. Each
        replica adds its own observations to `samples`; the last replica to flush sets `factor`."""
        with self._lock:
            changed = {
                alias: (learned.factor, learned.unsaved)
                for alias, learned in self._learned.items()
                if learned.unsaved
            }
            for alias in changed:
                self._learned[alias].unsaved = 0
        if not changed:
            return 0
        rows = [
            {"alias": alias, "factor": factor, "samples": unsaved}
            for alias, (factor, unsaved) in changed.items()
        ]
        statement = insert(token_factors).values(rows)
        statement = statement.on_conflict_do_update(
            index_elements=[token_factors.c.alias],
            set_={
                "factor": statement.excluded.factor,
                "samples": token_factors.c.samples + statement.excluded.samples,
                "updated_at": func.now(),
            },
        )
        try:
            async with engine.begin() as connection:
                await connection.execute(statement)
        except BaseException:
            with self._lock:  # not written: the next flush tries again
                for alias, (_, unsaved) in changed.items():
                    self._learned[alias].unsaved += unsaved
            raise
        return len(rows)


def starting_factor(alias: str, model: str | None, provider: str | None) -> float:
    """Where an alias starts: high on purpose (an under-count overflows the window, an over-count only
    sends a little less history), and higher for Claude, whose tokenizer is not o200k's."""
    names = f"{alias} {model or ''}".lower()
    return CLAUDE_FACTOR if provider == "anthropic" or "claude" in names else DEFAULT_FACTOR
