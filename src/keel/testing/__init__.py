"""Test doubles shipped with Keel: a fake upstream speaking the OpenAI and Anthropic wire formats, an OTLP
trace receiver, a TCP proxy that can cut a connection (a database outage on command), and an HTTP proxy
(CONNECT tunnels) as egress-controlled networks have."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.testing.fake_upstream import FakeUpstream, RecordedRequest, Reply, unused_base_url
    from keel.testing.http_proxy import HttpProxy
    from keel.testing.otlp import OtlpReceiver, ReceivedSpan
    from keel.testing.tcp_proxy import TcpProxy

__all__ = [
    "FakeUpstream",
    "HttpProxy",
    "KeelProcess",
    "OtlpReceiver",
    "ReceivedSpan",
    "RecordedRequest",
    "Reply",
    "TcpProxy",
    "unused_base_url",
]

_MODULES = {
    "FakeUpstream": "fake_upstream",
    "RecordedRequest": "fake_upstream",
    "Reply": "fake_upstream",
    "unused_base_url": "fake_upstream",
    "HttpProxy": "http_proxy",
    "OtlpReceiver": "otlp",
    "ReceivedSpan": "otlp",
    "TcpProxy": "tcp_proxy",
    "KeelProcess": "process",
}


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m keel.testing.fake_upstream` does not load the module twice.
    if name in _MODULES:
        return getattr(import_module(f"keel.testing.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
