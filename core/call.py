"""One chat request's state as it moves down the request path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_gateway.domain import Route, Target, Tenant, Usage

if TYPE_CHECKING:
    from llm_gateway.errors import GatewayError
    from llm_gateway.observability import RequestTrace


@dataclass(slots=True)
class Call:
    request_id: str
    client_request_id: str | None
    tenant: Tenant
    key_id: str
    model: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    route: Route | None = None
    started_at: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    reserved_tokens: int = 0
    encoding: str = "cl100k_base"
    target: Target | None = None
    attempts: int = 0
    ttft_ms: float | None = None
    status: int = 0
    usage: Usage = field(default_factory=Usage)
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trace: RequestTrace | None = None
    error: GatewayError | None = None
    finished: bool = False  # the end of the request (finish.finish) has run

    @property
    def client_wants_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage") is True

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    def mark_first_byte(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.t0) * 1000.0
