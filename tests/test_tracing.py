"""OpenTelemetry traces: an OTLP/HTTP receiver on loopback decodes what a 2-worker gateway
exports, and the span tree of a request that failed over once is checked against what the fake
upstreams received (their `traceparent`)."""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import FakeUpstream, Gateway, fake_upstream_process, gateway_process, unique

MSG = [{"role": "user", "content": "hello there"}]


class Receiver:
    """An OTLP/HTTP traces endpoint: collects every exported span."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest.FromString(body)
                with receiver._lock:
                    for rs in req.resource_spans:
                        receiver.resources.append(attrs(rs.resource.attributes))
                        for ss in rs.scope_spans:
                            receiver.spans.extend(ss.spans)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def trace(self, trace_id: bytes) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: bytes, n: int, deadline_s: float = 10) -> list[Span]:
        deadline = time.monotonic() + deadline_s
        while len(spans := self.trace(trace_id)) < n:
            assert time.monotonic() < deadline, f"{len(spans)} of {n} spans arrived"
            time.sleep(0.05)  # poll interval
        return spans


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def primary() -> Iterator[FakeUpstream]:
    with fake_upstream_process() as fake:
        yield fake


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Gateway]:
    with gateway_process(tmp_path_factory.mktemp("traced"),
                         OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100",
                         OTEL_SERVICE_NAME="gw-under-test",
                         GATEWAY_RETRIES_PER_TARGET="0") as gw:
        yield gw


def test_failover_span_tree(traced: Gateway, receiver: Receiver, primary: FakeUpstream,
                            fresh_upstream: FakeUpstream) -> None:
    primary.reset()
    backup = fresh_upstream
    model = unique("traced")
    traced.put_model(model,
                     {"provider": "openai", "base_url": primary.openai_base, "model": "p"},
                     {"provider": "openai", "base_url": backup.openai_base, "model": "b"})
    key = traced.create_tenant(unique("t"), rpm_limit=100)["api_key"]
    primary.faults({"kind": "status", "status": 500})
    trace_id, client_span = os.urandom(16), os.urandom(8)
    with openai.OpenAI(base_url=traced.base_url, api_key=key, max_retries=0) as client:
        r = client.chat.completions.create(
            model=model, messages=MSG, max_tokens=3,  # type: ignore[arg-type]
            extra_headers={"traceparent": f"00-{trace_id.hex()}-{client_span.hex()}-01"})
    assert r.usage is not None

    spans = receiver.wait_for(trace_id, 5)
    assert len(spans) == 5
    (server,) = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
    assert server.parent_span_id == client_span
    assert server.name == f"chat {model}"
    a = attrs(server.attributes)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == r.usage.completion_tokens == 3
    assert a["gen_ai.request.max_tokens"] == 3
    assert a["http.response.status_code"] == 200
    assert a["llm_gateway.attempts"] == 2
    assert a["llm_gateway.request_id"].startswith("req_")

    children = {s.name: s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_INTERNAL}
    assert set(children) == {"auth", "limiter"}
    attempts = sorted((s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_CLIENT),
                      key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in attempts] == ["chat p", "chat b"]
    assert [attrs(s.attributes)["llm_gateway.outcome"] for s in attempts] == [
        "status_502", "success"]  # an upstream 500 is a 502 here
    assert attrs(attempts[0].attributes)["error.type"] == "status_502"
    assert attempts[0].status.code == attempts[0].status.STATUS_CODE_ERROR
    assert [attrs(s.attributes)["llm_gateway.attempt"] for s in attempts] == [1, 2]
    for s in (*children.values(), *attempts):
        assert s.parent_span_id == server.span_id
    assert attempts[0].end_time_unix_nano <= attempts[1].start_time_unix_nano
    assert server.start_time_unix_nano <= children["auth"].start_time_unix_nano
    assert server.end_time_unix_nano >= attempts[1].end_time_unix_nano

    # Each upstream saw its own attempt's span as the parent, in the client's trace.
    (sent_primary,) = primary.requests()
    (sent_backup,) = backup.requests()
    assert sent_primary["headers"]["traceparent"] == \
        f"00-{trace_id.hex()}-{attempts[0].span_id.hex()}-01"
    assert sent_backup["headers"]["traceparent"] == \
        f"00-{trace_id.hex()}-{attempts[1].span_id.hex()}-01"
    assert any(res.get("service.name") == "gw-under-test" for res in receiver.resources)


def test_stream_without_client_context_starts_a_trace(
        traced: Gateway, receiver: Receiver, fresh_upstream: FakeUpstream) -> None:
    model = unique("traced-stream")
    traced.put_model(model, {"provider": "openai", "base_url": fresh_upstream.openai_base,
                             "model": "s"})
    key = traced.create_tenant(unique("t"))["api_key"]
    with openai.OpenAI(base_url=traced.base_url, api_key=key, max_retries=0) as client:
        for _ in client.chat.completions.create(model=model, messages=MSG, max_tokens=2,  # type: ignore[arg-type]
                                                stream=True):
            pass
    (sent,) = fresh_upstream.requests()
    _, trace_hex, attempt_hex, _ = sent["headers"]["traceparent"].split("-")
    spans = receiver.wait_for(bytes.fromhex(trace_hex), 4)
    (server,) = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
    assert server.parent_span_id == b""  # a root: the client sent no traceparent
    a = attrs(server.attributes)
    assert a["llm_gateway.stream"] is True
    assert a["gen_ai.usage.output_tokens"] == 2
    assert a["llm_gateway.ttft_ms"] > 0
    (attempt,) = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_CLIENT]
    assert attempt.span_id.hex() == attempt_hex


def test_traceparent_passes_through_without_tracing(gateway: Gateway,
                                                    fresh_upstream: FakeUpstream) -> None:
    """Tracing off (the shared gateway): the client's context still reaches the upstream."""
    model = unique("untraced")
    gateway.put_model(model, {"provider": "openai", "base_url": fresh_upstream.openai_base,
                              "model": "u"})
    key = gateway.create_tenant(unique("t"))["api_key"]
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as client:
        client.chat.completions.create(model=model, messages=MSG, max_tokens=1,  # type: ignore[arg-type]
                                       extra_headers={"traceparent": parent,
                                                      "tracestate": "vendor=1"})
    (sent,) = fresh_upstream.requests()
    assert sent["headers"]["traceparent"] == parent
    assert sent["headers"]["tracestate"] == "vendor=1"


def test_tracing_is_off_without_an_endpoint() -> None:
    from llm_gateway.settings import Settings

    assert not Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}).tracing_enabled
    assert Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}).tracing_enabled
    assert Settings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"}).tracing_enabled


def test_unsampled_client_context_travels_on(traced: Gateway,
                                             fresh_upstream: FakeUpstream) -> None:
    """A client that did not sample (flags 00): no spans recorded, the decision passed on."""
    model = unique("unsampled")
    traced.put_model(model, {"provider": "openai", "base_url": fresh_upstream.openai_base,
                             "model": "u"})
    key = traced.create_tenant(unique("t"))["api_key"]
    trace_id = os.urandom(16).hex()
    with openai.OpenAI(base_url=traced.base_url, api_key=key, max_retries=0) as client:
        client.chat.completions.create(
            model=model, messages=MSG, max_tokens=1,  # type: ignore[arg-type]
            extra_headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-00"})
    (sent,) = fresh_upstream.requests()
    version, got_trace, _, flags = sent["headers"]["traceparent"].split("-")
    assert (version, got_trace, flags) == ("00", trace_id, "00")
