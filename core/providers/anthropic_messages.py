"""Anthropic Messages (the client) -> Anthropic Messages (`anthropic` upstreams): bytes.

The request is forwarded with only `model` patched; the client's `anthropic-version` and
`anthropic-beta` headers go with it, and the route's credential as `x-api-key` (the tenant's key
never goes upstream). The response goes back as the upstream sent it; a stream's events are
relayed untouched (thinking blocks and their signatures included), and only `message_start`
(input and cache tokens) and `message_delta` (output tokens) are read, for the limits and the
ledger. An upstream `error` event is replaced by a generic one (its text may hold anything the
server's internals wrote). Until the usage is complete, the text and tool input deltas relayed
are counted off the loop, in case the stream is cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import GatewayError, UpstreamError
from llm_gateway.messages_request import anthropic_error_event
from llm_gateway.providers.anthropic import ANTHROPIC_VERSION, _usage, map_anthropic_error
from llm_gateway.providers.base import MAX_TOKENS, Counter, Headers, UpstreamRequest, token_count
from llm_gateway.providers.openai import STREAM_ERROR_MESSAGE
from llm_gateway.providers.sse import FrameSplitter, data_json, frame_data

if TYPE_CHECKING:
    from llm_gateway.ingress import Ask


def messages_headers(api_key: str | None, client: Headers) -> dict[str, str]:
    """An Anthropic upstream's request headers: the client's wire headers, the route's key."""
    headers = {"content-type": "application/json", "accept-encoding": "identity",
               "anthropic-version": ANTHROPIC_VERSION}
    headers.update(client)
    if api_key:
        headers["x-api-key"] = api_key
    return headers


class MessagesPassThrough:
    """The translator for (anthropic.messages, anthropic.messages)."""

    name = "anthropic"
    announces_prompt = False  # the upstream's message_start does

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None, headers: Headers = ()) -> UpstreamRequest:
        payload = raw if body.get("model") == target.model else orjson.dumps(
            {**body, "model": target.model})
        return UpstreamRequest(f"{target.base_url.rstrip('/')}/v1/messages",
                               messages_headers(api_key, headers), payload)

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        try:
            message = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise UpstreamError("the upstream provider returned invalid JSON") from None
        if not isinstance(message, dict):
            raise UpstreamError("the upstream provider returned an unexpected response")
        usage = _usage(message.get("usage"))
        if not usage.reported:
            usage.generated = tuple(_texts(message.get("content")))
        return content, usage

    def stream_translator(self, client_model: str, client_wants_usage: bool, count: Counter, *,
                          ask: Ask | None = None, prompt_tokens: int = 0) -> MessagesRelay:
        return MessagesRelay(count)

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        etype, message = anthropic_error_fields(content)
        return map_anthropic_error(status, etype, message or f"HTTP {status}", headers)


def anthropic_error_fields(content: bytes) -> tuple[str | None, str | None]:
    """The `error.type` and `error.message` of an Anthropic error body, where they are strings."""
    try:
        err = orjson.loads(content).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None, None
    if not isinstance(err, dict):
        return None, None
    etype, message = err.get("type"), err.get("message")
    return (etype if isinstance(etype, str) else None,
            message if isinstance(message, str) else None)


def _texts(content: Any) -> list[str]:
    out: list[str] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        for name in ("text", "thinking"):
            if isinstance(block.get(name), str):
                out.append(block[name])
        if block.get("type") == "tool_use":
            out.append(orjson.dumps(block.get("input")).decode())
    return out


_DELTA_FIELDS = ("text", "partial_json", "thinking")


def _delta_text(frames: list[bytes]) -> str:
    """The text generated in relayed `content_block_delta` events (run in a counting thread)."""
    texts: list[str] = []
    for frame in frames:
        data = data_json(frame)
        delta = data.get("delta") if isinstance(data, dict) else None
        if isinstance(delta, dict):
            texts.extend(delta[f] for f in _DELTA_FIELDS if isinstance(delta.get(f), str))
    return "".join(texts)


class MessagesRelay:
    """Relays an Anthropic stream event by event, reading only the usage it carries."""

    def __init__(self, count: Counter) -> None:
        self._split = FrameSplitter()
        self._input: int | None = None
        self._cache_read = 0
        self._cache_write = 0
        self._output: int | None = None
        self._ended = False
        self.generated = count(_delta_text)
        self.error: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        frames = self._split.feed(chunk)
        return b"".join([self._frame(f) for f in frames])

    def finish(self) -> bytes:
        rest = self._split.rest()
        out = self._frame(rest) if rest and not self._ended else b""
        if not self._ended and self._output is None:
            self._ended = True
            self.error = UpstreamError(
                "the upstream provider ended the stream before the reply was complete",
                code="upstream_incomplete_stream")
            out += anthropic_error_event(self.error)
        return out

    def usage(self) -> Usage:
        cached = min(self._cache_read, MAX_TOKENS)
        prompt = min((self._input or 0) + self._cache_write + cached, MAX_TOKENS)
        if self._input is not None and self._output is not None:
            return Usage(prompt, self._output, cached, reported=True)
        return Usage(prompt, 0, cached, reported=False)

    def _frame(self, frame: bytes) -> bytes:
        if self._ended:
            return b""
        kind = _event_name(frame)
        if kind == b"content_block_delta":
            if self._output is None:
                self.generated.add(frame)
        elif kind == b"message_start":
            data = data_json(frame)
            message = data.get("message") if isinstance(data, dict) else None
            if isinstance(message, dict):
                self._read_usage(message.get("usage"))
        elif kind == b"message_delta":
            data = data_json(frame)
            if isinstance(data, dict):
                self._read_usage(data.get("usage"), final=True)
        elif kind == b"message_stop":
            self._ended = self._output is not None
        elif kind == b"error":
            self._ended = True
            self.error = UpstreamError(STREAM_ERROR_MESSAGE)
            return anthropic_error_event(self.error)
        return frame + b"\n\n"

    def _read_usage(self, u: Any, final: bool = False) -> None:
        if not isinstance(u, dict):
            return
        given = token_count(u.get("input_tokens"))
        if given is not None:
            self._input = given
        for name, attr in (("cache_read_input_tokens", "_cache_read"),
                           ("cache_creation_input_tokens", "_cache_write")):
            n = token_count(u.get(name))
            if n is not None:
                setattr(self, attr, n)
        output = token_count(u.get("output_tokens"))
        if final and output is not None:
            self._output = output
            self.generated.discard()


def _event_name(frame: bytes) -> bytes:
    """The `event:` of a frame; for an unnamed one, its data's `type` (rare: Anthropic names
    every event)."""
    if frame.startswith(b"event:"):
        end = frame.find(b"\n")
        return frame[6:end if end >= 0 else None].strip()
    data = frame_data(frame)
    if data and b'"type"' in data:
        parsed = data_json(frame)
        if isinstance(parsed, dict) and isinstance(parsed.get("type"), str):
            return str(parsed["type"]).encode()
    return b""
