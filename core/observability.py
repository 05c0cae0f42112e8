"""Hooks the request path calls to be observed: metrics, traces, the per-request log line.

The request path only calls these functions; what they record lives in `metrics` (Prometheus,
multiprocess), `tracing` (OpenTelemetry) and `logs` (JSON lines). Each worker calls
`configure()` at start and `shutdown()` at stop; the parent calls `prepare_parent()` before it
forks anything.

For the usage writer (its own process, forked from the parent): call
`configure(settings, tracing=False)` once, then `set_usage_queue_depth(n)` and
`set_spooled_records(n)` update the two usage gauges (no-ops with metrics off);
`usage_spool_error()` and `usage_records_rejected(n)` count the ledger's failures there and in
workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blacksheep import Request
from llm_gateway.domain import Target, Tenant
from llm_gateway.errors import GatewayError, NotFound
from llm_gateway.settings import Settings
from llm_gateway.tracing import RequestTrace, Tracing

if TYPE_CHECKING:
    from types import ModuleType

    from llm_gateway.call import Call, Outcome

log = logging.getLogger("llm_gateway.request")
_INFO = logging.INFO

# Per process, set by configure(): the request path reads them without passing them around.
_metrics: ModuleType | None = None
_tracing: Tracing | None = None


def prepare_parent(settings: Settings) -> None:
    """In the parent, before any worker or the usage writer exists: a fresh multiprocess
    directory, named in the environment the children inherit."""
    if not settings.metrics_enabled:
        return
    if "prometheus_client" in sys.modules:
        # Its value class was chosen at import, without the directory: the files would be empty.
        raise RuntimeError("prometheus_client was imported before its multiprocess directory "
                           "was set")
    path = settings.metrics_dir
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def configure(settings: Settings, *, tracing: bool = True) -> None:
    """In a worker (or the usage writer), after the fork."""
    global _metrics, _tracing
    if settings.metrics_enabled and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from llm_gateway import metrics

        _metrics = metrics
    if tracing and settings.tracing_enabled and _tracing is None:
        _tracing = Tracing()


def shutdown() -> None:
    """Flush batched spans and retire this process's live gauges."""
    global _tracing
    if _tracing is not None:
        _tracing.shutdown()
        _tracing = None
    if _metrics is not None:
        _metrics.mark_process_dead()


def metrics_enabled() -> bool:
    return _metrics is not None


async def render_metrics(queue_depth: int) -> tuple[bytes, bytes]:
    """The scrape: content type and body, aggregated over every worker's files."""
    assert _metrics is not None
    _metrics.QUEUE_DEPTH.set(queue_depth)
    # Reading every worker's files takes milliseconds: off the event loop.
    body = await asyncio.to_thread(_metrics.render)
    return _metrics.CONTENT_TYPE, body


def start_request(request: Request, request_id: str) -> RequestTrace:
    return RequestTrace(
        _tracing.tracer if _tracing is not None else None,
        request.get_first_header(b"traceparent"),
        request.get_first_header(b"tracestate"),
        request_id,
        _tracing.root if _tracing is not None else None,
    )


@dataclass(slots=True)
class AttemptSpan:
    outcome: str = "error"


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        if exc.status == 429:
            return "rate_limited"
        if exc.code in ("upstream_unreachable", "upstream_disconnected", "upstream_timeout"):
            return str(exc.code).removeprefix("upstream_")
        return f"status_{exc.status}"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return type(exc).__name__


@contextmanager
def attempt_span(call: Call, target: Target, attempt: int) -> Iterator[AttemptSpan]:
    span = AttemptSpan()
    trace = call.trace
    otel = trace.start_attempt({
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": target.provider,
        "gen_ai.request.model": target.model,
        "llm_gateway.target": target.name,
        "llm_gateway.attempt": attempt,
    }) if trace is not None else None
    try:
        yield span
    except BaseException as exc:
        span.outcome = failure_reason(exc)
        raise
    finally:
        if _metrics is not None:
            _metrics.attempts(target.provider, target.name, span.outcome).inc()
            if span.outcome != "success":
                _metrics.upstream_errors(target.provider, target.name, span.outcome).inc()
        if trace is not None:
            trace.end_attempt(otel, span.outcome)


def attempt_skipped(call: Call, target: Target, reason: str) -> None:
    if _metrics is not None:
        _metrics.upstream_errors(target.provider, target.name, reason).inc()
    if call.trace is not None:
        call.trace.event("attempt_skipped", {"llm_gateway.target": target.name,
                                             "llm_gateway.reason": reason})


def inject_trace_headers(call: Call, headers: dict[str, str]) -> None:
    if call.trace is not None:
        call.trace.inject(headers)


def request_rejected(trace: RequestTrace, tenant: Tenant | None, model: str,
                     exc: GatewayError, endpoint: str = "") -> None:
    """A request refused before it reached the limiter (401, 400, 403, 404)."""
    tenant_id = tenant.tenant_id if tenant is not None else ""
    # An unknown model name is the client's text: never a label, and not the span's name.
    known = model if not isinstance(exc, NotFound) else ""
    if _metrics is not None:
        _metrics.requests(tenant_id, known, "", str(exc.status), endpoint).inc()
    error = str(exc.code or exc.type)
    trace.end(exc.status, known, None, error)
    if log.isEnabledFor(_INFO):
        log.info("request", extra={"fields": {
            "request_id": trace.request_id, "trace_id": trace.trace_id, "tenant": tenant_id,
            "model": model[:128], "status": exc.status, "error": error,
        }})


def request_finished(call: Call, outcome: Outcome) -> None:
    """Once per request that reached the limiter, when its response is complete (for a
    stream, when the stream ends)."""
    target = outcome.target
    provider = target.provider if target is not None else ""
    model, status, usage = call.model, outcome.status, outcome.usage
    tenant = call.tenant.tenant_id
    latency_s = call.elapsed_ms() / 1000.0
    ttft_ms = outcome.ttft_ms
    cost = call.route.cost(usage.input_tokens, usage.output_tokens)
    m = _metrics
    if m is not None:
        endpoint = call.ingress.endpoint
        m.requests(tenant, model, provider, str(status), endpoint).inc()
        m.duration(model, provider, endpoint).observe(latency_s)
        if call.stream and ttft_ms is not None:
            m.ttft(model, provider).observe(ttft_ms / 1000.0)
        if usage.input_tokens:
            m.tokens(tenant, model, "input").inc(usage.input_tokens)
        if usage.output_tokens:
            m.tokens(tenant, model, "output").inc(usage.output_tokens)
        if cost:
            m.cost(tenant, model).inc(cost)
    failure = outcome.error
    error = str(failure.code or failure.type) if failure is not None else None
    trace = call.trace
    if trace is not None:
        recording = trace.span is not None and trace.span.is_recording()
        attrs = _span_attrs(call, outcome, provider, tenant) if recording else None
        trace.end(status, model, attrs, error)
    if log.isEnabledFor(_INFO):
        log.info("request", extra={"fields": {
            "request_id": call.request_id,
            "client_request_id": call.client_request_id,
            "trace_id": trace.trace_id if trace is not None else None,
            "tenant": tenant,
            "model": model,
            "endpoint": call.ingress.endpoint,
            "provider": provider or None,
            "target": target.name if target is not None else None,
            "status": status,
            "error": error,
            "stream": call.stream,
            "latency_ms": round(latency_s * 1000.0, 3),
            "ttft_ms": round(ttft_ms, 3) if ttft_ms is not None else None,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cost": cost,
            "attempts": outcome.attempts,
        }})


def _span_attrs(call: Call, outcome: Outcome, provider: str, tenant: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": outcome.usage.input_tokens,
        "gen_ai.usage.output_tokens": outcome.usage.output_tokens,
        "llm_gateway.tenant": tenant,
        "llm_gateway.stream": call.stream,
        "llm_gateway.attempts": outcome.attempts,
    }
    if provider:
        attrs["gen_ai.provider.name"] = provider
    if outcome.ttft_ms is not None:
        attrs["llm_gateway.ttft_ms"] = outcome.ttft_ms
    if call.ask.max_output_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = call.ask.max_output_tokens
    return attrs


def rate_limited(call: Call, limit: str) -> None:
    if _metrics is not None:
        _metrics.rate_limited(call.tenant.tenant_id, limit).inc()
    if call.trace is not None:
        call.trace.annotate_child("llm_gateway.rate_limited", limit)


def limiter_error() -> None:
    if _metrics is not None:
        _metrics.LIMITER_ERRORS.inc()


def circuit_state(target: str, value: int) -> None:
    """A breaker changed state (0 closed, 1 half-open, 2 open), in this worker."""
    if _metrics is not None:
        _metrics.circuit(target).set(value)


def set_usage_queue_depth(n: int) -> None:
    if _metrics is not None:
        _metrics.QUEUE_DEPTH.set(n)


def set_spooled_records(n: int) -> None:
    if _metrics is not None:
        _metrics.SPOOLED.set(n)


def usage_spool_error() -> None:
    """A spool write failed; its records were kept."""
    if _metrics is not None:
        _metrics.SPOOL_ERRORS.inc()


def usage_records_rejected(n: int) -> None:
    """Records the store can never accept went to quarantine."""
    if _metrics is not None:
        _metrics.RECORDS_REJECTED.inc(n)
