"""One request on the request path: what was asked (`Call`, set once when the request is
admitted) and what came of it (`Outcome`, filled in as the request ends)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llm_gateway.domain import Route, Target, Tenant, Usage

if TYPE_CHECKING:
    from llm_gateway.errors import GatewayError
    from llm_gateway.ingress import Ask, Ingress
    from llm_gateway.observability import RequestTrace


@dataclass(frozen=True, slots=True)
class Call:
    """An admitted request: authenticated, parsed, routed and allowed."""

    request_id: str
    client_request_id: str | None
    tenant: Tenant
    key_id: str
    ask: Ask
    route: Route
    ingress: Ingress
    encoding: str  # the tokenizer that counts this model's text
    trace: RequestTrace | None = None
    started_at: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def model(self) -> str:
        return self.ask.model

    @property
    def stream(self) -> bool:
        return self.ask.stream

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0


@dataclass(slots=True)
class Tries:
    """The attempts on upstream targets so far (the router counts them; the record reports
    them, also when every attempt failed)."""

    target: Target | None = None  # the last one tried
    count: int = 0


@dataclass(slots=True)
class Outcome:
    """What came of a call: written by the step that ends it, read by `finish`."""

    status: int = 0
    usage: Usage = field(default_factory=Usage)
    error: GatewayError | None = None
    tries: Tries = field(default_factory=Tries)
    ttft_ms: float | None = None
    finished: bool = False  # `finish` has run

    @property
    def target(self) -> Target | None:
        return self.tries.target

    @property
    def attempts(self) -> int:
        return self.tries.count
