"""Usage records: one per request that reached the limiter, built here, handed to a sink.

Workers never write the ledger on the request path: the sink puts the record on a queue that the
dedicated usage-writer process drains (`llm_gateway.workers.usage_writer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llm_gateway.call import Call

RECORD_FIELDS = (
    "request_id", "tenant_id", "key_id", "model", "provider", "target", "input_tokens",
    "output_tokens", "cost", "status", "latency_ms", "ttft_ms", "stream", "started_at",
)


class UsageSink(Protocol):
    def emit(self, record: dict[str, Any]) -> None: ...

    def flush(self) -> None:
        """Hand over whatever is still buffered (a worker calls it before it stops)."""
        ...

    def depth(self) -> int:
        """Batches of records handed over but not yet written, where known (for metrics)."""
        ...


class NullSink:
    """No ledger (tests of other parts, benchmarks of the bare path)."""

    def emit(self, record: dict[str, Any]) -> None:
        return None

    def flush(self) -> None:
        return None

    def depth(self) -> int:
        return 0


def usage_record(call: Call) -> dict[str, Any]:
    target = call.target
    usage = call.usage
    return {
        "request_id": call.request_id,
        "client_request_id": call.client_request_id,
        "tenant_id": call.tenant.tenant_id,
        "key_id": call.key_id,
        "model": call.model,
        "provider": target.provider if target else None,
        "target": target.name if target else None,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cost": call.route.cost(usage.input_tokens, usage.output_tokens) if call.route else 0.0,
        "status": call.status,
        "latency_ms": round(call.latency_ms(), 3),
        "ttft_ms": round(call.ttft_ms, 3) if call.ttft_ms is not None else None,
        "stream": call.stream,
        "started_at": call.started_at,
        "usage_source": "upstream" if usage.reported else "counted",
    }
