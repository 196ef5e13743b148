"""Traces as a collector sees them: a real Keel exporting OTLP/HTTP to a real receiver, the official SDK."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from keel.telemetry.tracing import SPAN_CONTENT_ATTRIBUTES, SPAN_CONTENT_MAX_CHARS
from keel.testing import FakeUpstream, OtlpReceiver, ReceivedSpan, Reply
from keel.testing.server import KeelServer

STAGES = ("auth", "rate_limit", "prompt.resolve", "retrieval", "context.assemble", "model.call", "record")
SERVER_SPAN = "POST /v1/chat/completions"
ATTEMPT_SPAN = "chat fake-gpt"
SECRET = "my parrot is called Zanzibar"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def traced(start_keel: Callable[..., KeelServer], receiver: OtlpReceiver) -> KeelServer:
    return start_keel(otlp_endpoint=receiver.endpoint)


def _request_trace(
    receiver: OtlpReceiver, request_id: str, names: tuple[str, ...] = ()
) -> dict[str, ReceivedSpan]:
    """The spans of the request's trace by name, once its server span and every named span arrived."""

    def spans_of(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan] | None:
        server = [s for s in spans if s.attributes.get("keel.client_request_id") == request_id]
        if len(server) != 1:
            return None
        found = {s.name: s for s in spans if s.trace_id == server[0].trace_id}
        return found if set(names) <= set(found) else None

    found = spans_of(receiver.wait_for(lambda spans: spans_of(spans) is not None, timeout=10))
    assert found is not None
    return found


def _chat(client: openai.OpenAI, request_id: str, *, stream: bool, **extra: Any) -> str:
    messages: Any = [{"role": "user", "content": SECRET}]
    headers = {"X-Request-ID": request_id, **extra.pop("extra_headers", {})}
    options: dict[str, Any] = {"max_tokens": 50, "temperature": 0.2, "extra_headers": headers, **extra}
    if not stream:
        reply = client.chat.completions.create(model="fake", messages=messages, **options)
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model="fake", messages=messages, stream=True, stream_options={"include_usage": True}, **options
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _every_value(span: ReceivedSpan) -> str:
    return repr(span.attributes)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_completion_is_one_trace_with_a_span_per_stage(
    traced: KeelServer,
    receiver: OtlpReceiver,
    tenant: Any,
    fake: FakeUpstream,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
    stream: bool,
) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    fake.enqueue(Reply(text="Zanzibar is a fine name.", input_tokens=17, output_tokens=6))
    client = make_client(traced, tenant.chat_key)
    text = _chat(client, request_id, stream=stream, extra_body={"conversation_id": conversation})
    assert text == "Zanzibar is a fine name."

    spans = _request_trace(receiver, request_id, (*STAGES, "context.load", ATTEMPT_SPAN))
    server = spans[SERVER_SPAN]
    assert server.kind == "SERVER"
    assert server.parent_span_id == ""
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.resource["service.name"] == "keel"
    assert len({s.trace_id for s in spans.values()}) == 1
    assert len(server.trace_id) == 32 and int(server.trace_id, 16)
    for name in (*STAGES, "context.load"):
        if name != "model.call":
            assert spans[name].parent_span_id == server.span_id, name
        assert server.start_ns <= spans[name].start_ns <= spans[name].end_ns <= server.end_ns, name
    assert spans["model.call"].parent_span_id == server.span_id

    attempt = spans[ATTEMPT_SPAN]
    assert attempt.kind == "CLIENT"
    assert attempt.parent_span_id == spans["model.call"].span_id
    assert attempt.status_code == "UNSET"
    assert {k: v for k, v in attempt.attributes.items() if k.startswith("gen_ai.")} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fake-gpt",
        "gen_ai.response.model": "fake-gpt",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 17,
        "gen_ai.usage.output_tokens": 6,
        "gen_ai.conversation.id": conversation,
    }
    assert "error.type" not in attempt.attributes
    # Message content stays off spans unless trace_content is on: not the prompt, not the reply.
    for span in spans.values():
        assert "Zanzibar" not in _every_value(span), span.name


def test_without_a_conversation_there_is_no_load_span_and_no_conversation_id(
    traced: KeelServer,
    receiver: OtlpReceiver,
    tenant: Any,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    _chat(make_client(traced, tenant.chat_key), request_id, stream=False)
    spans = _request_trace(receiver, request_id, (*STAGES, ATTEMPT_SPAN))
    assert "context.load" not in spans
    assert "gen_ai.conversation.id" not in spans[ATTEMPT_SPAN].attributes


def test_message_content_is_on_spans_when_asked(
    start_keel: Callable[..., KeelServer],
    receiver: OtlpReceiver,
    tenant: Any,
    fake: FakeUpstream,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    server = start_keel(otlp_endpoint=receiver.endpoint, trace_content=True)
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    fake.enqueue(Reply(text="Hello, Zanzibar."))
    _chat(make_client(server, tenant.chat_key), request_id, stream=True)
    attempt = _request_trace(receiver, request_id, (ATTEMPT_SPAN,))[ATTEMPT_SPAN]
    assert SECRET in str(attempt.attributes["gen_ai.input.messages"])
    assert "Hello, Zanzibar." in str(attempt.attributes["gen_ai.output.messages"])


def test_span_content_is_redacted_and_capped(
    start_keel: Callable[..., KeelServer],
    receiver: OtlpReceiver,
    tenant: Any,
    fake: FakeUpstream,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    server = start_keel(otlp_endpoint=receiver.endpoint, trace_content=True)
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    key = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
    fake.enqueue(Reply(text=f"Your key {key} is noted."))
    make_client(server, tenant.chat_key).chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": f"{SECRET}: {key} " + "x" * 100_000}],
        extra_headers={"X-Request-ID": request_id},
    )
    attempt = _request_trace(receiver, request_id, (ATTEMPT_SPAN,))[ATTEMPT_SPAN]
    sent, answered = (str(attempt.attributes[name]) for name in SPAN_CONTENT_ATTRIBUTES)
    assert SECRET in sent and "[REDACTED]" in sent and "[REDACTED]" in answered
    assert key not in sent + answered
    assert len(sent) < SPAN_CONTENT_MAX_CHARS + 100 and "[TRUNCATED" in sent
    assert fake.requests[-1].body["messages"][0]["content"].endswith("x" * 100_000)  # upstream: all of it


@pytest.mark.parametrize("exported", [True, False], ids=["otlp", "no-exporter"])
def test_a_client_traceparent_cannot_force_sampling(
    start_keel: Callable[..., KeelServer],
    receiver: OtlpReceiver,
    tenant: Any,
    fake: FakeUpstream,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
    exported: bool,
) -> None:
    """The trace id is the client's; whether it is sampled is Keel's configured ratio (0 here)."""
    server = start_keel(otlp_endpoint=receiver.endpoint if exported else None, trace_sample_ratio=0.0)
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    _chat(
        make_client(server, tenant.chat_key),
        request_id,
        stream=False,
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},  # 01: "sampled, please"
    )
    _version, upstream_trace, _parent, flags = fake.requests[-1].headers["traceparent"].split("-")
    assert (upstream_trace, flags) == (trace_id, "00")  # joined, but not sampled
    deadline = time.monotonic() + 10
    while (response := _record(server, tenant.admin_key, request_id)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert response["trace_id"] == trace_id
    time.sleep(1.5)  # past the exporter's 1 s batch delay
    assert receiver.trace(trace_id) == []


def _record(server: KeelServer, key: str, request_id: str) -> dict[str, Any] | None:
    response = httpx.get(
        f"{server.base_url}/requests/{request_id}", headers={"Authorization": f"Bearer {key}"}
    )
    if response.status_code != 200:
        return None
    record: dict[str, Any] = response.json()
    return record


def test_a_client_traceparent_is_honoured_and_propagated_upstream(
    traced: KeelServer,
    receiver: OtlpReceiver,
    tenant: Any,
    fake: FakeUpstream,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    _chat(
        make_client(traced, tenant.chat_key),
        request_id,
        stream=True,
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    spans = _request_trace(receiver, request_id, (*STAGES, ATTEMPT_SPAN))
    server = spans[SERVER_SPAN]
    assert server.trace_id == trace_id
    assert server.parent_span_id == parent_id
    assert {s.trace_id for s in spans.values()} == {trace_id}

    # The upstream call carries the trace on, its parent one of this trace's spans.
    upstream = fake.requests[-1].headers.get("traceparent", "")
    version, upstream_trace, upstream_parent, _flags = upstream.split("-")
    assert (version, upstream_trace) == ("00", trace_id)
    assert upstream_parent in {s.span_id for s in spans.values()}


def test_the_upstream_call_carries_the_trace_of_the_request(
    traced: KeelServer,
    receiver: OtlpReceiver,
    tenant: Any,
    fake: FakeUpstream,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    _chat(make_client(traced, tenant.chat_key), request_id, stream=False)
    server = _request_trace(receiver, request_id)[SERVER_SPAN]
    upstream = fake.requests[-1].headers.get("traceparent", "")
    assert upstream.split("-")[1:2] == [server.trace_id]


def test_a_failed_upstream_call_marks_the_attempt_span(
    traced: KeelServer,
    receiver: OtlpReceiver,
    tenant: Any,
    fake: FakeUpstream,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    fake.enqueue(*[Reply(status=400, error_message="no such thing") for _ in range(3)])
    with pytest.raises(openai.BadRequestError):
        _chat(make_client(traced, tenant.chat_key), request_id, stream=False)
    spans = _request_trace(receiver, request_id, ("model.call", ATTEMPT_SPAN))
    attempt = spans[ATTEMPT_SPAN]
    assert attempt.attributes["error.type"]
    assert attempt.status_code == "ERROR"
    assert "gen_ai.usage.output_tokens" not in attempt.attributes
    assert spans["model.call"].status_code == "ERROR"
    assert spans[SERVER_SPAN].attributes["http.response.status_code"] == 400


def test_the_audit_record_carries_the_request_id_and_the_trace_id(
    traced: KeelServer,
    receiver: OtlpReceiver,
    tenant: Any,
    make_client: Callable[[KeelServer, str], openai.OpenAI],
) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:10]}"
    _chat(make_client(traced, tenant.chat_key), request_id, stream=True)
    server = _request_trace(receiver, request_id)[SERVER_SPAN]
    deadline = time.monotonic() + 10
    while True:  # records are written off the critical path
        response = httpx.get(
            f"{traced.base_url}/requests/{request_id}",
            headers={"Authorization": f"Bearer {tenant.admin_key}"},
        )
        if response.status_code != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["client_request_id"] == request_id
    assert record["id"] == server.attributes["keel.request_id"]
    assert record["trace_id"] == server.trace_id
