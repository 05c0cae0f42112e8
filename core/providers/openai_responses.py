"""OpenAI Responses -> OpenAI Responses: an `openai` target serves `/v1/responses` itself.

The request goes to `{base_url}/responses` with only `model` substituted (`previous_response_id`,
`store` and `background` untouched), and the answer is relayed as the upstream sent it, JSON or
SSE. What the gateway reads of it is the usage: `usage.input_tokens`, `usage.output_tokens`,
and where present `input_tokens_details.cached_tokens` and
`output_tokens_details.reasoning_tokens`.

A stream's usage is in its last event (`response.completed`, `response.incomplete` or
`response.failed`), which repeats the whole output and so may be megabytes: only its tail is
kept, where OpenAI writes `usage`. Until usage is known, the text of delta events is tallied,
in case the stream is cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import GatewayError, UpstreamError
from llm_gateway.providers.base import Counter, UpstreamRequest, token_count, upstream_json
from llm_gateway.providers.openai import STREAM_ERROR_MESSAGE, openai_request, with_model
from llm_gateway.providers.sse import MAX_FRAME_BYTES, data_json

_TERMINAL = frozenset((b"response.completed", b"response.incomplete", b"response.failed"))
_DELTAS = frozenset((b"response.output_text.delta", b"response.refusal.delta",
                     b"response.function_call_arguments.delta"))
_FAILURES = frozenset((b"response.failed", b"error"))
# The id in the head of `response.created`, whose `response` object OpenAI starts with it.
_RESPONSE_ID = re.compile(rb'"response":\s*\{\s*"id":\s*"([A-Za-z0-9_-]{1,128})"')
# Bytes of an event read to learn its type, and of a final event kept to find its usage.
HEAD_BYTES = 256
TAIL_BYTES = 64 * 1024


def responses_request(target: Target, body: dict[str, Any], raw: bytes, *,
                      api_key: str | None) -> UpstreamRequest:
    """The upstream request: the client's bytes, re-encoded only when the model differs."""
    return openai_request(target, "responses", api_key, with_model(body, raw, target.model))


def responses_usage(data: Any) -> Usage:
    """The usage of a Responses `response` object; unreported unless both counts are valid."""
    u = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(u, dict):
        return Usage()
    given, output = token_count(u.get("input_tokens")), token_count(u.get("output_tokens"))
    if given is None or output is None:
        return Usage()
    cached = _detail(u, "input_tokens_details", "cached_tokens")
    reasoning = _detail(u, "output_tokens_details", "reasoning_tokens")
    return Usage(given, output, min(cached, given), reported=True,
                 reasoning_tokens=min(reasoning, output))


def _detail(usage: dict[str, Any], group: str, name: str) -> int:
    details = usage.get(group)
    return (token_count(details.get(name)) or 0) if isinstance(details, dict) else 0


def response_texts(data: Any) -> list[str]:
    """What a response generated (message text, refusals, function calls), to count when the
    upstream reported no usage. Anything else is skipped, whatever its shape."""
    texts: list[str] = []
    output = data.get("output") if isinstance(data, dict) else None
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            texts.extend(v for v in (item.get("name"), item.get("arguments"))
                         if isinstance(v, str))
        content = item.get("content") if item.get("type") == "message" else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict):
                texts.extend(v for v in (part.get("text"), part.get("refusal"))
                             if isinstance(v, str))
    return texts


def parse_responses_response(content: bytes) -> tuple[bytes, Usage]:
    """A successful non-stream answer: relayed as is, with its usage."""
    content, usage, _ = parse_responses_reply(content)
    return content, usage


def parse_responses_reply(content: bytes) -> tuple[bytes, Usage, str | None]:
    """`parse_responses_response`, and the response's id (None if it has none)."""
    data = upstream_json(content)
    usage = responses_usage(data)
    if not usage.reported:
        usage.generated = tuple(response_texts(data))
    response_id = data.get("id")
    return content, usage, response_id if isinstance(response_id, str) else None


class ResponsesPassthroughStream:
    """Relays Responses SSE bytes untouched, reading usage from the final event.

    Memory: the head of the event being read (to learn its type), a delta event until it ends
    (at most `MAX_FRAME_BYTES`), and the tail of a final event; never the stream. `finish` adds
    nothing (a Responses stream has no `[DONE]`).
    """

    def __init__(self, count: Counter,
                 on_id: Callable[[str], None] | None = None) -> None:
        self._on_id = on_id  # told the response's id, from its first event
        self._events = 0  # events ended so far: OpenAI numbers them from 0, one by one
        self._cr = False  # the last chunk ended in "\r"
        self._nl = False  # the last byte read ended a line
        self._head = bytearray()  # the current event's first bytes
        self._kind: bytes | None = None  # its type, once known
        self._body: bytearray | None = None  # what is kept of it (delta: all; final: the tail)
        self._usage: Usage | None = None
        self.generated = count()
        self.error: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        view = chunk
        if self._cr:
            view, self._cr = b"\r" + view, False
        if b"\r" in view:
            if view.endswith(b"\r"):
                view, self._cr = view[:-1], True
            view = view.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while start < len(view):
            if self._nl and view[start:start + 1] == b"\n":
                self._end_event()
                start += 1
                self._nl = False
                continue
            at = view.find(b"\n\n", start)
            if at < 0:
                self._take(view[start:])
                self._nl = view.endswith(b"\n")
                break
            self._take(view[start:at])
            self._end_event()
            start, self._nl = at + 2, False
        return chunk

    def finish(self) -> bytes:
        if self._cr:
            self._cr, self._nl = False, True
        self._end_event()
        return b""

    def usage(self) -> Usage:
        return self._usage if self._usage is not None else Usage()

    def fail(self, error: GatewayError) -> bytes:
        """Ends the client's stream with an `error` event (after the end of an event cut
        short), numbered after the events relayed; `error` is what the request records."""
        if self.error is None:
            self.error = error
        cut = b"\n\n" if self._head or self._kind is not None else b""
        self._events += bool(cut)  # the event cut short ends here: it took its number
        self._head, self._kind, self._body = bytearray(), None, None
        event = orjson.dumps({"type": "error", "code": error.code, "message": error.message,
                              "param": error.param, "sequence_number": self._events})
        self._events += 1
        return cut + b"event: error\ndata: " + event + b"\n\n"

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self._kind is None:
            room = HEAD_BYTES - len(self._head)
            self._head += data[:room]
            if len(self._head) < HEAD_BYTES:
                return
            self._classify()
            data = data[room:]
        body = self._body
        if body is None or not data:
            return
        body += data
        if self._kind in _TERMINAL:
            if len(body) > 2 * TAIL_BYTES:
                del body[:-TAIL_BYTES]
        elif len(body) > MAX_FRAME_BYTES:
            self._body = None  # a delta this large is left to the final usage

    def _classify(self) -> None:
        head = bytes(self._head).lstrip(b"\n")
        kind = b""
        if head.startswith(b"event:"):
            kind = head[6:].split(b"\n", 1)[0].strip()
        else:
            at = head.find(b'"type":')
            if at >= 0:
                kind = head[at + 7:].lstrip(b" ")[1:].split(b'"', 1)[0]
        self._kind = kind
        if kind == b"response.created" and self._on_id is not None:
            found = _RESPONSE_ID.search(head)
            if found:
                self._on_id(found.group(1).decode())
            self._on_id = None
        if kind in _FAILURES and self.error is None:
            self.error = UpstreamError(STREAM_ERROR_MESSAGE)
        keep = kind in _TERMINAL or (kind in _DELTAS and self._usage is None)
        self._body = bytearray(self._head) if keep else None

    def _end_event(self) -> None:
        if self._kind is None and self._head.strip():
            self._classify()
        if self._kind is not None:
            self._events += 1
        body, kind = self._body, self._kind
        self._head, self._kind, self._body = bytearray(), None, None
        if body is None or self._usage is not None:
            return
        if kind in _TERMINAL:
            usage = _tail_usage(bytes(body))
            if usage.reported:
                self._usage = usage
                self.generated.discard()
            return
        data = data_json(bytes(body).lstrip(b"\n"))
        delta = data.get("delta") if isinstance(data, dict) else None
        if isinstance(delta, str):
            self.generated.add(delta)


def _tail_usage(tail: bytes) -> Usage:
    """The usage in the end of a final event: the whole event when it is short, else the object
    after its last `"usage":` key (a key, since quotes inside JSON strings are escaped)."""
    if len(tail) <= TAIL_BYTES:
        data = data_json(tail.lstrip(b"\n"))
        if isinstance(data, dict):
            return responses_usage(data.get("response"))
    at = tail.rfind(b'"usage":')
    end = _object_end(tail, at + 8) if at >= 0 else -1
    if end < 0:
        return Usage()
    try:
        usage = orjson.loads(tail[at + 8:end].strip())
    except orjson.JSONDecodeError:
        return Usage()
    return responses_usage({"usage": usage})


def _object_end(data: bytes, start: int) -> int:
    """The end of the JSON object starting at `start` (after blanks), or -1."""
    while start < len(data) and data[start:start + 1] in b" \t\n":
        start += 1
    if data[start:start + 1] != b"{":
        return -1
    depth, i, n = 0, start, len(data)
    while i < n:
        c = data[i]
        if c == 0x22:  # a string: skip it, escapes included
            i += 1
            while i < n and data[i] != 0x22:
                i += 2 if data[i] == 0x5C else 1
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1
