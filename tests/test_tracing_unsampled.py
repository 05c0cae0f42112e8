"""Under the SDK's ratio sampler, an unsampled root request starts no span at all, yet the
upstream gets the traceparent the SDK would have sent, and the sampled share is the ratio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llm_gateway.tracing import RequestTrace, RootSampling, Tracing


@pytest.fixture
def tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tracing]:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nobody there
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.2")  # so shutdown gives up at once
    t = Tracing()
    yield t
    t.shutdown()


def test_unsampled_roots_make_no_span_and_send_the_sdks_traceparent(tracing: Tracing) -> None:
    assert isinstance(tracing.root, RootSampling)
    sampler = tracing.provider.sampler
    n, sampled = 4000, 0
    for _ in range(n):
        trace = RequestTrace(tracing.tracer, None, None, "req_x", tracing.root)
        headers: dict[str, str] = {}
        span = trace.start_attempt({"gen_ai.request.model": "m"})
        trace.inject(headers)
        trace.end_attempt(span, "success")
        version, trace_id, span_id, flags = headers["traceparent"].split("-")
        assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
        assert trace.trace_id == trace_id
        decision = sampler.should_sample(None, int(trace_id, 16), "chat").decision
        if trace.span is None:
            assert flags == "02" and not decision.is_sampled()
            assert span is None
        else:
            sampled += 1
            assert trace.span.is_recording() and decision.is_sampled()
            assert trace.span.get_span_context().trace_id == int(trace_id, 16)
            assert flags == "03"
        trace.end(200, "m")
    assert 0.2 * n < sampled < 0.3 * n


def test_an_incoming_trace_context_still_goes_through_the_sdk(tracing: Tracing) -> None:
    parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    trace = RequestTrace(tracing.tracer, parent, None, "req_y", tracing.root)
    assert trace.span is not None and trace.span.is_recording()
    assert trace.trace_id == "0af7651916cd43dd8448eb211c80319c"
    unsampled = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    trace = RequestTrace(tracing.tracer, unsampled, None, "req_z", tracing.root)
    headers: dict[str, str] = {}
    trace.inject(headers)
    assert trace.span is not None and not trace.span.is_recording()
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
