"""Hooks the request path calls to be observed: metrics, traces, the per-request log line.

The request path only calls these functions; what they record lives here (issue #6 fills them
in: Prometheus multiprocess metrics, OpenTelemetry spans, JSON logs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blacksheep import Request
from llm_gateway.domain import Target, Tenant
from llm_gateway.errors import GatewayError

if TYPE_CHECKING:
    from llm_gateway.call import Call


class RequestTrace:
    """The server span of one request and its children (auth, limiter, attempts)."""

    @contextmanager
    def child(self, name: str) -> Iterator[None]:
        yield

    def end(self, status: int) -> None:
        return None


@dataclass(slots=True)
class AttemptSpan:
    outcome: str = "error"


def start_request(request: Request, request_id: str) -> RequestTrace:
    return RequestTrace()


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        if exc.status == 429:
            return "rate_limited"
        if exc.code in ("upstream_unreachable", "upstream_disconnected", "upstream_timeout"):
            return str(exc.code).removeprefix("upstream_")
        return f"status_{exc.status}"
    return type(exc).__name__


@contextmanager
def attempt_span(call: Call, target: Target) -> Iterator[AttemptSpan]:
    span = AttemptSpan()
    try:
        yield span
    except BaseException as exc:
        span.outcome = failure_reason(exc)
        raise


def attempt_skipped(call: Call, target: Target, reason: str) -> None:
    return None


def inject_trace_headers(call: Call, headers: dict[str, str]) -> None:
    return None


def request_rejected(trace: RequestTrace, tenant: Tenant | None, model: str,
                     exc: GatewayError) -> None:
    trace.end(exc.status)


def request_finished(call: Call) -> None:
    if call.trace is not None:
        call.trace.end(call.status)


def rate_limited(call: Call, limit: str) -> None:
    return None


def limiter_error() -> None:
    return None
