"""Resilience for the model layer: retries, fallbacks, circuit breakers, deadlines, concurrency limits.

Each is a `ChatModel` wrapping a `ChatModel`; `build_stacks` composes them per alias from settings.
The policy in plain words, with every knob: docs/resilience.md.
"""

from keel.llm.resilience.balancer import Balancer, Deployment
from keel.llm.resilience.breaker import CLOSED, HALF_OPEN, OPEN, BreakerModel, CircuitBreaker
from keel.llm.resilience.classify import CircuitOpenError, FailureKind, classify
from keel.llm.resilience.deadline import AttemptTimeouts, DeadlineModel
from keel.llm.resilience.factory import ModelStacks, build_stacks
from keel.llm.resilience.fallback import FallbackModel, Link
from keel.llm.resilience.instrument import InstrumentedModel
from keel.llm.resilience.limit import ConcurrencyLimit
from keel.llm.resilience.retry import RetryModel, retry_after
from keel.llm.resilience.shared import SharedBreakers

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "AttemptTimeouts",
    "Balancer",
    "BreakerModel",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConcurrencyLimit",
    "DeadlineModel",
    "Deployment",
    "FailureKind",
    "FallbackModel",
    "InstrumentedModel",
    "Link",
    "ModelStacks",
    "RetryModel",
    "SharedBreakers",
    "build_stacks",
    "classify",
    "retry_after",
]
