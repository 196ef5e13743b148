"""Per-variant numbers of an experiment, from the audit records and the feedback, and the tests on them.

Two tests, both on proportions (error rate; negative-feedback rate, a score under 0.5):
- `status` shows a two-sided two-proportion z-test (pooled) of each variant against the baseline, p < 0.05.
- the canary guard runs a one-sided test against a tolerance margin, H0: p_canary - p_baseline <= margin,
  with the Agresti-Caffo adjustment (one success and one failure added to each arm), which keeps the
  standard error honest at small counts and at rates of 0 or 1. It is judged only once both arms reach a
  minimum sample, at a strict alpha, because it is looked at again and again as traffic comes in.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

SIGNIFICANT = 0.05

_REQUESTS = text(
    """
    SELECT (prompt->>'version')::int AS version,
           count(*) AS requests,
           count(*) FILTER (WHERE status = 'error') AS errors,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'ok') AS p50,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE status = 'ok') AS p99,
           avg(output_tokens) FILTER (WHERE status = 'ok') AS output_tokens
    FROM audit_requests
    WHERE tenant_id = :tenant AND prompt->>'experiment' = :experiment
    GROUP BY 1
    """
)
_FEEDBACK = text(
    """
    SELECT (prompt->>'version')::int AS version,
           count(*) AS feedback,
           avg(value) AS score,
           count(*) FILTER (WHERE value < 0.5) AS negative
    FROM feedback
    WHERE tenant_id = :tenant AND prompt->>'experiment' = :experiment
    GROUP BY 1
    """
)


@dataclass(slots=True)
class VariantStats:
    version: int
    variant: str
    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_output_tokens: float | None = None
    feedback: int = 0
    negative: int = 0
    feedback_score: float | None = None  # mean on the 0.0-1.0 scale
    tests: dict[str, Any] = field(default_factory=dict)  # against the baseline

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def negative_rate(self) -> float:
        return self.negative / self.feedback if self.feedback else 0.0

    def json(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_rate"] = round(self.error_rate, 4)
        data["negative_rate"] = round(self.negative_rate, 4)
        for key in ("p50_ms", "p99_ms", "mean_output_tokens", "feedback_score"):
            if data[key] is not None:
                data[key] = round(data[key], 3)
        return data


async def variant_stats(
    engine: AsyncEngine, tenant_id: uuid.UUID, experiment_id: uuid.UUID, variants: dict[int, str]
) -> dict[int, VariantStats]:
    """Numbers per version of the experiment; `variants` names each version (baseline, canary, v5)."""
    found = {version: VariantStats(version, variant) for version, variant in variants.items()}
    params = {"tenant": tenant_id, "experiment": str(experiment_id)}
    async with engine.connect() as conn:
        requests = (await conn.execute(_REQUESTS, params)).all()
        feedback = (await conn.execute(_FEEDBACK, params)).all()
    for row in requests:
        stats = found.setdefault(row.version, VariantStats(row.version, f"v{row.version}"))
        stats.requests, stats.errors = row.requests, row.errors
        stats.p50_ms, stats.p99_ms = row.p50, row.p99
        stats.mean_output_tokens = float(row.output_tokens) if row.output_tokens is not None else None
    for row in feedback:
        stats = found.setdefault(row.version, VariantStats(row.version, f"v{row.version}"))
        stats.feedback, stats.negative, stats.feedback_score = row.feedback, row.negative, row.score
    return found


def compare(baseline: VariantStats, other: VariantStats) -> dict[str, Any]:
    """Two-sided pooled two-proportion z-tests of `other` against `baseline`."""
    errors = two_sided_p(other.errors, other.requests, baseline.errors, baseline.requests)
    negative = two_sided_p(other.negative, other.feedback, baseline.negative, baseline.feedback)
    return {
        "error_rate_p": _round(errors),
        "error_rate_significant": errors is not None and errors < SIGNIFICANT,
        "negative_rate_p": _round(negative),
        "negative_rate_significant": negative is not None and negative < SIGNIFICANT,
    }


def two_sided_p(x1: int, n1: int, x2: int, n2: int) -> float | None:
    if n1 == 0 or n2 == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0  # both arms all-or-nothing alike: no evidence of a difference
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def worse_beyond_margin(x_canary: int, n_canary: int, x_base: int, n_base: int, margin: float) -> float:
    """One-sided p-value of H0: p_canary - p_baseline <= margin (Agresti-Caffo adjusted Wald z)."""
    p_c = (x_canary + 1) / (n_canary + 2)
    p_b = (x_base + 1) / (n_base + 2)
    se = math.sqrt(p_c * (1 - p_c) / (n_canary + 2) + p_b * (1 - p_b) / (n_base + 2))
    z = (p_c - p_b - margin) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
