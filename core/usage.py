"""Usage records: one per request that reached the limiter, built here, handed to a sink.

Workers never write the ledger on the request path: the sink puts the record on a queue that the
dedicated usage-writer process drains (`llm_gateway.workers.usage_writer`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

from llm_gateway.ledger import MAX_TOKENS, UsageRecord

if TYPE_CHECKING:
    from llm_gateway.call import Call, Outcome


class UsageSink(Protocol):
    def emit(self, record: UsageRecord) -> None: ...

    def flush(self) -> None:
        """Hand over whatever is still buffered (a worker calls it before it stops)."""
        ...

    def depth(self) -> int:
        """Batches of records handed over but not yet written, where known (for metrics)."""
        ...


def usage_record(call: Call, outcome: Outcome) -> UsageRecord:
    """The record of a finished request, valid whatever the upstream or the route said: token
    counts in [0, 2**53], a cost that is finite or null, text orjson can encode; so every
    store can take it."""
    target = outcome.target
    usage = outcome.usage
    input_tokens, output_tokens = _tokens(usage.input_tokens), _tokens(usage.output_tokens)
    return {
        "request_id": call.request_id,
        "client_request_id": call.client_request_id,
        "tenant_id": call.tenant.tenant_id,
        "key_id": call.key_id,
        "model": _text(call.model),
        "provider": target.provider if target else None,
        "target": _text(target.name) if target else None,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cost": _cost(call, input_tokens, output_tokens),
        "status": outcome.status,
        "latency_ms": round(call.elapsed_ms(), 3),
        "ttft_ms": round(outcome.ttft_ms, 3) if outcome.ttft_ms is not None else None,
        "stream": call.stream,
        "started_at": call.started_at,
        "usage_source": "upstream" if usage.reported else "counted",
        "endpoint": call.ingress.endpoint,
        "cached_input_tokens": min(_tokens(usage.cached_tokens), input_tokens),
        "reasoning_tokens": min(_tokens(usage.reasoning_tokens), output_tokens),
    }


def _tokens(n: Any) -> int:
    """A usage number as the ledger keeps it: an integer in [0, MAX_TOKENS] (0 if not one)."""
    if isinstance(n, bool) or not isinstance(n, int | float) or math.isnan(n):
        return 0
    return int(min(max(n, 0), MAX_TOKENS))


def _cost(call: Call, input_tokens: int, output_tokens: int) -> float | None:
    """The route's price of the tokens; null when it is not a finite number (a huge price)."""
    try:
        cost = float(call.route.cost(input_tokens, output_tokens))
    except (ArithmeticError, TypeError, ValueError):
        return None
    return cost if math.isfinite(cost) else None


def _text(s: Any) -> str:
    """`s` with anything UTF-8 cannot carry (a lone surrogate) replaced, so orjson encodes it."""
    if not isinstance(s, str):
        return "" if s is None else str(s)
    if s.isascii():
        return s
    return s.encode("utf-8", "replace").decode("utf-8")
