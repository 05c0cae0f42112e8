"""OpenTelemetry traces: a server span per chat request, child spans for auth, the limiter and
each upstream attempt, W3C trace context in from clients and out to upstreams.

    chat <model>                       SERVER  (parent: the client's traceparent, if any)
    ├── auth                           INTERNAL
    ├── limiter                        INTERNAL
    ├── chat <upstream model>          CLIENT  one per attempt: retries and failover show
    └── chat <upstream model>          CLIENT  (its traceparent goes to the upstream)

Off unless an OTLP endpoint is configured. Each worker has its own TracerProvider, built after
the fork (the batch processor's thread would not survive one), with a BatchSpanProcessor so
export happens on its thread, off the request path. The OTel SDK reads the standard OTEL_*
variables itself. Spans are never made the global current span: parents are passed explicitly,
since a request's spans outlive the handler's task when a stream is relayed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_EMPTY = Context()
# Kept short: every attribute is validated on set and encoded again on export.
_SERVER_ATTRS = {"http.request.method": "POST", "http.route": "/v1/chat/completions",
                 "gen_ai.operation.name": "chat"}


class Tracing:
    """One worker's tracer provider; `shutdown()` flushes what is still batched."""

    def __init__(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "llm-gateway"}))
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.root = RootSampling.of(self.provider)
        if self.root is not None:
            self.provider.id_generator = self.root.ids
        self.tracer = self.provider.get_tracer("llm_gateway")

    def shutdown(self) -> None:
        self.provider.shutdown()


def _preset_ids() -> Any:
    """The SDK's random ids, except a trace id handed over by `RootSampling` just before the
    span that must carry it is started."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        preset: int | None = None

        def generate_trace_id(self) -> int:
            trace_id, self.preset = self.preset, None
            return trace_id if trace_id is not None else super().generate_trace_id()

    return PresetIds()


class RootSampling:
    """The SDK's decision for a root span (no incoming trace context) under its default
    ratio sampler (`parentbased_traceidratio` or `traceidratio`), made without starting a span:
    the trace id is drawn here (as the SDK draws it), and an unsampled request gets no span at
    all, only its ids for the upstream's traceparent. A sampled one is started by the SDK with
    that same trace id, so its sampler decides the same."""

    def __init__(self, bound: int, limit: int) -> None:
        self.ids = _preset_ids()
        self._bound, self._limit = bound, limit
        # W3C flags of an unsampled root span, as the SDK sets them: "random trace id" (0x02).
        self.flags = 0x02 if self.ids.is_trace_id_random() else 0x00

    @classmethod
    def of(cls, provider: Any) -> RootSampling | None:
        """None unless the provider uses the SDK's own random ids and ratio sampler."""
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import (
            ParentBased,
            ParentBasedTraceIdRatio,
            TraceIdRatioBased,
        )

        sampler = provider.sampler
        if type(sampler) in (ParentBased, ParentBasedTraceIdRatio):
            sampler = sampler._root  # the sampler of a span without a parent
        if type(sampler) is not TraceIdRatioBased:
            return None
        if type(provider.id_generator) is not RandomIdGenerator:
            return None
        return cls(sampler.bound, sampler.TRACE_ID_LIMIT)

    def draw(self) -> tuple[int, bool]:
        """A new root trace id and whether the sampler records it."""
        trace_id = self.ids.generate_trace_id()
        return trace_id, trace_id & self._limit < self._bound


class RequestTrace:
    """The server span of one request and its children. Without tracing it only carries the
    client's trace context through to the upstream (a pass-through proxy)."""

    __slots__ = (
        "_attempt",
        "_child",
        "_ctx",
        "_ended",
        "_incoming",
        "_tracer",
        "_unsampled",
        "request_id",
        "span",
    )

    def __init__(self, tracer: Any, traceparent: bytes | None, tracestate: bytes | None,
                 request_id: str, root: RootSampling | None = None) -> None:
        self._tracer = tracer
        self.request_id = request_id
        self._child: Span | None = None
        self._attempt: Span | None = None
        self._ended = False
        self._incoming: dict[str, str] = {}
        if traceparent is not None:
            self._incoming["traceparent"] = traceparent.decode("latin-1")
            if tracestate is not None:
                self._incoming["tracestate"] = tracestate.decode("latin-1")
        self.span: Span | None = None
        self._ctx = _EMPTY
        self._unsampled: str | None = None  # an unsampled root's traceparent (no span made)
        if tracer is not None:
            if root is not None and not self._incoming:
                trace_id, sampled = root.draw()
                if not sampled:
                    self._tracer = None
                    span_id = root.ids.generate_span_id()
                    self._unsampled = f"00-{trace_id:032x}-{span_id:016x}-{root.flags:02x}"
                    return
                root.ids.preset = trace_id  # the span below gets it, and the same decision
            parent = _PROPAGATOR.extract(self._incoming) if self._incoming else _EMPTY
            self.span = tracer.start_span(
                "chat", context=parent, kind=SpanKind.SERVER,
                attributes={**_SERVER_ATTRS, "llm_gateway.request_id": request_id},
            )
            self._ctx = trace.set_span_in_context(self.span)
            if not self.span.is_recording():
                # Not sampled: children would be dropped too; the server span's context is
                # still what upstreams get, so the sampling decision travels on.
                self._tracer = None

    @property
    def trace_id(self) -> str | None:
        if self.span is not None:
            ctx = self.span.get_span_context()
            return f"{ctx.trace_id:032x}" if ctx.trace_id else None
        parts = (self._unsampled or self._incoming.get("traceparent", "")).split("-")
        return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None

    @contextmanager
    def child(self, name: str) -> Iterator[None]:
        if self._tracer is None:
            yield
            return
        span = self._child = self._tracer.start_span(name, context=self._ctx)
        try:
            yield
        except BaseException as exc:
            _fail(span, _error_type(exc))
            raise
        finally:
            self._child = None
            span.end()

    def annotate_child(self, key: str, value: str) -> None:
        if self._child is not None:
            self._child.set_attribute(key, value)

    def start_attempt(self, attrs: Mapping[str, Any]) -> Span | None:
        if self._tracer is None:
            return None
        model = attrs.get("gen_ai.request.model", "")
        self._attempt = self._tracer.start_span(
            f"chat {model}", context=self._ctx, kind=SpanKind.CLIENT, attributes=attrs
        )
        return self._attempt

    def end_attempt(self, span: Span | None, outcome: str) -> None:
        if span is None:
            return
        span.set_attribute("llm_gateway.outcome", outcome)
        if outcome != "success":
            _fail(span, outcome)
        span.end()

    def inject(self, headers: dict[str, str]) -> None:
        """The current attempt's trace context, for the upstream request."""
        if self._attempt is not None:
            _PROPAGATOR.inject(headers, context=trace.set_span_in_context(self._attempt))
        elif self.span is not None:
            _PROPAGATOR.inject(headers, context=self._ctx)
        elif self._unsampled is not None:
            headers["traceparent"] = self._unsampled
        elif self._incoming:
            headers.update(self._incoming)

    def event(self, name: str, attrs: Mapping[str, Any]) -> None:
        if self.span is not None:
            self.span.add_event(name, attrs)

    def end(self, status: int, model: str = "", attrs: Mapping[str, Any] | None = None,
            error_type: str | None = None) -> None:
        """End the server span (once; later calls are ignored)."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        if span is None:
            return
        if model:
            span.update_name(f"chat {model}")
            span.set_attribute("gen_ai.request.model", model)
        span.set_attribute("http.response.status_code", status)
        if attrs:
            span.set_attributes(attrs)
        if error_type:
            span.set_attribute("error.type", error_type)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


def _fail(span: Span, error_type: str) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR))


def _error_type(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return str(code) if code else type(exc).__name__
