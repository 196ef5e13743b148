"""The canary guard: pauses a canary by itself when it is measurably worse than its baseline.

Off the request path: the resolver only notes which canaries it served (a dict write); every
`canary_check_seconds` the guard reads those canaries' numbers from the audit records and the feedback and
tests them (stats.py). A pause drops the canary's share to 0, records an event with the numbers that
triggered it and logs them. Every replica guards the canaries it serves; the first pause wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from keel.prompts.experiment_store import ExperimentStore
from keel.prompts.stats import VariantStats, variant_stats, worse_beyond_margin
from keel.settings import PromptSettings

log = logging.getLogger(__name__)

WATCH_SECONDS = 60.0  # keep judging a canary this long after it last served: its records land later


def judge(baseline: VariantStats, canary: VariantStats, settings: PromptSettings) -> dict[str, Any] | None:
    """The numbers that justify a pause, or None."""
    checks = (
        ("error_rate", "errors", "requests", settings.canary_min_requests, settings.canary_error_margin),
        (
            "negative_feedback_rate",
            "negative",
            "feedback",
            settings.canary_min_feedback,
            settings.canary_feedback_margin,
        ),
    )
    for metric, bad, total, minimum, margin in checks:
        n_c, n_b = getattr(canary, total), getattr(baseline, total)
        if n_c < minimum or n_b < minimum:
            continue
        x_c, x_b = getattr(canary, bad), getattr(baseline, bad)
        p = worse_beyond_margin(x_c, n_c, x_b, n_b, margin)
        if p < settings.canary_alpha:
            return {
                "metric": metric,
                "canary": {"version": canary.version, bad: x_c, total: n_c, "rate": round(x_c / n_c, 4)},
                "baseline": {"version": baseline.version, bad: x_b, total: n_b, "rate": round(x_b / n_b, 4)},
                "margin": margin,
                "p_value": p,
                "alpha": settings.canary_alpha,
                "test": "one-sided two-proportion z-test against the margin (Agresti-Caffo)",
            }
    return None


class CanaryGuard:
    def __init__(self, engine: AsyncEngine, experiments: ExperimentStore, settings: PromptSettings) -> None:
        self._engine = engine
        self._experiments = experiments
        self._settings = settings
        self._served: dict[uuid.UUID, float] = {}
        self._task: asyncio.Task[None] | None = None

    def served(self, experiment_id: uuid.UUID) -> None:
        self._served[experiment_id] = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keel-canary-guard")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.canary_check_seconds)
            for experiment_id, last in list(self._served.items()):
                if time.monotonic() - last > WATCH_SECONDS:
                    del self._served[experiment_id]
                    continue
                try:
                    if not await self.check(experiment_id):
                        self._served.pop(experiment_id, None)
                except Exception:  # the database may be away; judge again next round
                    log.warning("canary check of experiment %s failed", experiment_id, exc_info=True)

    async def check(self, experiment_id: uuid.UUID) -> bool:
        """Judge one canary now; False when it no longer runs (nothing left to guard)."""
        info = await self._experiments.get(experiment_id)
        if info.status != "running" or info.kind != "canary" or info.candidate is None:
            return False
        variants = {info.baseline: "baseline", info.candidate: "canary"}
        stats = await variant_stats(self._engine, info.tenant_id, info.id, variants)
        details = judge(stats[info.baseline], stats[info.candidate], self._settings)
        if details is None:
            return True
        if await self._experiments.pause(experiment_id, details):
            log.warning(
                "canary %s@%s (label %s) paused: %s %s vs baseline %s, margin %s, p=%.2g",
                info.name,
                info.candidate,
                info.label,
                details["metric"],
                details["canary"],
                details["baseline"],
                details["margin"],
                details["p_value"],
                extra={"experiment": str(experiment_id), "pause": details},
            )
        return False
