"""What every provider adapter does, and nothing more.

An adapter translates one wire format pair: the client always speaks OpenAI Chat Completions,
the upstream speaks the provider's protocol. Translation runs again on each retry and each
failover target, so it must never mutate the parsed request body it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import GatewayError, UpstreamError


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes


class StreamTranslator(Protocol):
    """Turns the upstream's raw stream bytes into OpenAI `chat.completion.chunk` SSE bytes.

    `feed` receives chunks exactly as read from the socket (frames may be split anywhere) and
    returns the bytes to send to the client now (possibly empty). `finish` is called once when
    the upstream ended normally and returns the tail (always ending with `data: [DONE]`).
    `usage()` gives the usage the upstream reported, or counts what was generated so far when
    it reported none (also after a cut-off stream). `error` is set when the upstream sent an
    error inside the stream (already relayed to the client as an error event).
    """

    error: GatewayError | None

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def usage(self) -> Usage: ...


class Provider(Protocol):
    name: str

    def build_request(
        self, target: Target, body: dict, raw: bytes, *, stream: bool, api_key: str | None
    ) -> UpstreamRequest:
        """The upstream request for `body` (the client's parsed JSON; `raw` its bytes)."""
        ...

    def parse_response(self, content: bytes, client_model: str) -> tuple[bytes, Usage]:
        """A successful non-stream response -> (OpenAI `chat.completion` bytes, usage)."""
        ...

    def stream_translator(
        self, client_model: str, client_wants_usage: bool, encoding: str
    ) -> StreamTranslator: ...

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        """An upstream error response -> the error the client sees (classified by status and
        the body's type field, never by message text)."""
        ...


def upstream_json(content: bytes) -> dict[str, Any]:
    """A successful upstream response body as a JSON object, or the 502 that says it was not."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise UpstreamError("the upstream provider returned invalid JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError("the upstream provider returned an unexpected response")
    return data
