"""What every provider adapter does, and nothing more.

A translator handles one pair of wire formats: the client's (its ingress's `wire`) and the
upstream's (its provider's `wire`); `providers.TRANSLATORS` holds one per pair. Translation runs
again on each retry and each failover target, so it must never mutate the parsed request body
it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import GatewayError, UpstreamError

if TYPE_CHECKING:
    from llm_gateway.call import Call
    from llm_gateway.ingress import Ask
    from llm_gateway.services import Services

# The client's headers a translator may forward (`Ask.headers`), as (lower-case name, value).
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes


class Tally(Protocol):
    """The tokens of a reply as it streams, counted off the event loop in bounded memory
    (`tokens.OutputTally`)."""

    def add(self, item: str | bytes) -> None: ...

    def discard(self) -> None: ...

    def full(self) -> bool: ...

    async def room(self) -> None: ...

    async def total(self) -> int: ...

    def count(self) -> int: ...


class Counter(Protocol):
    """How a translator counts what a stream generated when the upstream does not say: a new
    `Tally` in the call's encoding, for pieces `extract` turns into text (by default the pieces
    are the text). Given to `stream_translator`, so translators never pick a tokenizer."""

    def __call__(self, extract: Callable[[list[Any]], str] = ..., /) -> Tally: ...


class StreamTranslator(Protocol):
    """Turns the upstream's raw stream bytes into OpenAI `chat.completion.chunk` SSE bytes.

    `feed` receives chunks exactly as read from the socket (frames may be split anywhere) and
    returns the bytes to send to the client now (possibly empty). `finish` is called once when
    the upstream ended normally and returns the tail (always ending with `data: [DONE]`).
    `usage()` gives the usage the upstream reported; when it reported none (or numbers that are
    not counts), `reported` is False and `generated` holds what was generated so far (also after
    a cut-off stream), counted off the event loop: `await generated.total()`. `error` is set
    when the upstream sent an error inside the stream (already relayed to the client as an
    error event). A translator holds at most one pending frame (`MAX_FRAME_BYTES`) and one
    slice of uncounted reply, whatever the stream's length.
    """

    error: GatewayError | None
    generated: Tally

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def usage(self) -> Usage: ...


class Provider(Protocol):
    name: str
    # Its streams announce the prompt's tokens before the upstream says them (Anthropic's
    # `message_start`): the request path counts the prompt first, when the limits did not.
    announces_prompt: bool

    def build_request(
        self, target: Target, body: dict, raw: bytes, *, stream: bool, api_key: str | None,
        headers: Headers = (),
    ) -> UpstreamRequest:
        """The upstream request for `body` (the client's parsed JSON; `raw` its bytes;
        `headers` the client's headers its ingress keeps for a same-wire upstream)."""
        ...

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        """A successful non-stream response -> (the client's wire format's bytes, usage).
        `ask` is the client's request; `prompt_tokens` the gateway's count (0: not counted)."""
        ...

    def stream_translator(
        self, client_model: str, client_wants_usage: bool, count: Counter, *,
        ask: Ask | None = None, prompt_tokens: int = 0,
    ) -> StreamTranslator: ...

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        """An upstream error response -> the error the client sees (classified by status and
        the body's type field, never by message text)."""
        ...


# Usage numbers stay exact in a float (JSON readers, the ledger's sums): larger ones are clamped.
MAX_TOKENS = 2**53


def token_count(value: Any) -> int | None:
    """A usage number from an upstream: a non-negative integer (clamped at 2**53), else None
    (1e25, -5, "12", true, 12.5 are not counts: the gateway counts itself instead)."""
    if type(value) is not int or value < 0:
        return None
    return min(value, MAX_TOKENS)


def upstream_json(content: bytes) -> dict[str, Any]:
    """A successful upstream response body as a JSON object, or the 502 that says it was not."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise UpstreamError("the upstream provider returned invalid JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError("the upstream provider returned an unexpected response")
    return data


def for_call(translator: Provider, svc: Services, call: Call, target: Target) -> Provider:
    """The translator for one call: `translator` itself, or, where its replies depend on the
    call (a Responses object echoes the request; a relayed response id is remembered with the
    tenant and target that served it), its `for_call(svc, call, target)`: a copy bound to it."""
    bind = getattr(translator, "for_call", None)
    return translator if bind is None else bind(svc, call, target)  # type: ignore[no-any-return]
