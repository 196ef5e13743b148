"""Test doubles shipped with Keel: a fake upstream speaking the OpenAI and Anthropic wire formats."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.testing.fake_upstream import FakeUpstream, RecordedRequest, Reply

__all__ = ["FakeUpstream", "RecordedRequest", "Reply"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m keel.testing.fake_upstream` does not load the module twice.
    if name in __all__:
        from keel.testing import fake_upstream

        return getattr(fake_upstream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
