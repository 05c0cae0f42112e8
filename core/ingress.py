"""What an endpoint is to the request path: an *ingress*.

An ingress reads the client's body into an `Ask` (the facts the path needs: model, stream,
output limit, whether the client wants usage in a stream) and knows how to count its prompt and
how to write errors in the client's own wire format. Everything between (auth, limits, routing
with failover, the relay, the end of the request) is written once in `pipeline`. The translator
from the ingress's wire format to a target's is chosen from the table in `providers`, by the
pair (`Ingress.wire`, the provider's wire).

A new endpoint: a module with its `Ingress`, its translators, their rows in
`providers.TRANSLATORS`, and one line in `app.ROUTES` (`("POST", path, endpoint(INGRESS))`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from blacksheep import Content, Response
from llm_gateway.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Ask:
    """A client's request, read once. `body` is the parsed JSON (translators read it, never
    write it), `raw` its bytes (forwarded as they are where the wire formats agree)."""

    model: str
    stream: bool
    max_output_tokens: int | None  # the client's own limit, if it set one
    wants_usage: bool  # a stream's client asked for the usage chunk
    body: dict[str, Any]
    raw: bytes
    # The client's headers its wire format defines (e.g. `anthropic-version`), for a translator
    # whose upstream speaks the same format; never credentials.
    headers: tuple[tuple[str, str], ...] = ()


class Ingress(Protocol):
    wire: str  # the client's wire format: the first half of a translator's key
    endpoint: str  # its name in usage records and metric labels, e.g. "chat.completions"

    def parse(self, raw: bytes, max_depth: int) -> Ask:
        """The client's body, checked for what the gateway relies on (400 with `param`)."""
        ...

    async def count_prompt(self, ask: Ask, encoding: str) -> int:
        """The prompt's tokens (for the reservation, and when the upstream reports none)."""
        ...

    def error_response(self, exc: GatewayError) -> Response:
        """An error as the client's SDK expects it."""
        ...

    def stream_error(self, exc: GatewayError) -> bytes:
        """The event that ends a stream which failed after its first byte (unless the stream's
        translator has its own `fail(exc) -> bytes`, which knows the stream's state)."""
        ...

    # Optional: `async def check_access(svc, tenant, route, ask) -> None`, run once the route is
    # allowed, for requests that name the tenant's earlier ones (Responses'
    # `previous_response_id`): raises the error the client gets.


def openai_error_response(exc: GatewayError) -> Response:
    """An error in OpenAI's JSON shape with its headers (`Retry-After`, the rate-limit ones):
    what every OpenAI-protocol ingress answers."""
    headers = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    return Response(exc.status, headers, Content(b"application/json", exc.body()))
