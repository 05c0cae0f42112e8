"""The Chat Completions ingress: the client's body read once, bounded, parsed once into an `Ask`;
errors in OpenAI's JSON. `read_body` and `parse_json_object` serve every ingress."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
from blacksheep import Request, Response
from llm_gateway.deadline import deadline
from llm_gateway.errors import (
    CLIENT_TEXT_MAX,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    error_body,
)
from llm_gateway.ingress import Ask, openai_error_response
from llm_gateway.tokens import count_prompt

_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))
# Route names are at most this long (the admin API enforces it), so a longer one is refused
# before any lookup or cache entry, and every message quoting it stays short.
MAX_MODEL_CHARS = CLIENT_TEXT_MAX


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `max_bytes`, and with
    408 when it has not arrived whole within `timeout_s` (a stalled client holds a worker's
    request slot, its buffers and its tenant's concurrency only that long)."""
    try:
        with deadline(timeout_s):
            raw = await _read_body(request, max_bytes)
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_s:g} seconds."
        ) from None
    coding = request.get_first_header(b"content-encoding")
    if coding is None or coding.strip().lower() in (b"", b"identity"):
        return raw
    return decode_body(raw, coding.strip().lower(), max_bytes)


# zlib's window bits for each Content-Encoding: gzip, and deflate (zlib-wrapped, as HTTP says,
# or raw, as some clients send it).
_WBITS = {b"gzip": (16 + zlib.MAX_WBITS,), b"x-gzip": (16 + zlib.MAX_WBITS,),
          b"deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS)}


def decode_body(raw: bytes, coding: bytes, max_bytes: int) -> bytes:
    """A compressed body, inflated; the limit holds for the inflated bytes, and inflating stops
    the moment it passes it (a small bomb costs `max_bytes` of work, never more)."""
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise InvalidRequest(f"Content-Encoding {coding.decode('latin-1')[:32]!r} is not "
                             "supported; use gzip or deflate.", code="unsupported_encoding")
    for i, bits in enumerate(wbits):
        try:
            return _inflate(raw, bits, max_bytes)
        except zlib.error:
            if i + 1 == len(wbits):
                raise InvalidRequest(f"The request body is not valid {coding.decode()} data.",
                                     code="invalid_encoding") from None
    raise AssertionError("unreachable")


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while data:  # one gzip member per round (a stream may hold several)
        d = zlib.decompressobj(wbits)
        while data:
            out = d.decompress(data, max_bytes + 1 - size)
            size += len(out)
            if size > max_bytes:
                raise PayloadTooLarge(
                    f"The decoded request body is larger than the limit of {max_bytes} bytes.")
            parts.append(out)
            data = d.unconsumed_tail
            if d.eof:
                break
        if not d.eof:
            raise zlib.error("truncated")
        data = d.unused_data
    return b"".join(parts)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.get_first_header(b"content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise _too_large(max_bytes)
        except ValueError:
            raise InvalidRequest("invalid Content-Length header") from None
        # The server frames the body by its Content-Length: it cannot grow past it.
        return await request.read() or b""
    parts: list[bytes] = []
    size = 0
    # BlackSheep declares `stream` a coroutine; it is an async generator.
    async for chunk in cast(AsyncIterator[bytes], request.stream()):
        if chunk:
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {max_bytes} bytes.")


def parse_json_object(raw: bytes, max_depth: int) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.",
                             code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Cheap bound first: nesting can never exceed the number of opening brackets.
    if raw.count(b"{") + raw.count(b"[") > max_depth and _depth(body) > max_depth:
        raise InvalidRequest(f"The request JSON is nested deeper than {max_depth} levels.",
                             code="json_too_deep")
    return body


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return deepest


def parse_chat(raw: bytes, max_depth: int) -> Ask:
    """A Chat Completions body, checked for what the gateway relies on. Unknown fields are left
    for the upstream."""
    body = parse_json_object(raw, max_depth)
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise invalid("'model' must be a non-empty string", "model", "invalid_type")
    if len(model) > MAX_MODEL_CHARS:
        raise invalid(f"'model' must be at most {MAX_MODEL_CHARS} characters", "model",
                       "invalid_value")
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is a required property", "messages",
                       "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array", "messages", "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise invalid(f"messages[{i}].role must be one of {sorted(_ROLES)}",
                           f"messages[{i}].role", "invalid_value")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(f"messages[{i}].content must be a string or an array of parts",
                           f"messages[{i}].content", "invalid_type")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream", "invalid_type")
    # max_completion_tokens replaced max_tokens; when both are set it is the one that holds.
    limit: int | None = None
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise invalid(f"'{name}' must be a positive integer", name, "invalid_value")
            limit = v if limit is None else limit
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
    return Ask(
        model=model,
        stream=stream is True,
        max_output_tokens=limit,
        wants_usage=opts is not None and opts.get("include_usage") is True,
        body=body,
        raw=raw,
    )


def invalid(message: str, param: str, code: str) -> InvalidRequest:
    """A 400 naming the client's field (`param`), for every ingress."""
    return InvalidRequest(message, param=param, code=code)


class ChatIngress:
    """`POST /v1/chat/completions`."""

    wire = "openai.chat"
    endpoint = "chat.completions"

    def parse(self, raw: bytes, max_depth: int) -> Ask:
        return parse_chat(raw, max_depth)

    async def count_prompt(self, ask: Ask, encoding: str) -> int:
        return await count_prompt(ask.body, encoding, len(ask.raw))

    def error_response(self, exc: GatewayError) -> Response:
        return openai_error_response(exc)

    def stream_error(self, exc: GatewayError) -> bytes:
        # The SDKs raise an APIError for a `data: {"error": ...}` event.
        return b"data: " + error_body(exc.message, exc.type, exc.code) + b"\n\n"


CHAT = ChatIngress()
