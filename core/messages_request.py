"""The Anthropic Messages ingress (`POST /v1/messages`): a client's Messages request, whatever
its route: the top-level checks, the prompt count for limits and for routes whose upstream
cannot count, and errors in Anthropic's shape, `{"type": "error", "error": {"type",
"message"}}`, before a stream starts and as its `error` event after. The pair translations live
in `providers/` (`anthropic_messages` for Anthropic upstreams, `anthropic_to_openai` for
OpenAI-protocol ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from blacksheep import Content, Request, Response
from llm_gateway.chat_request import MAX_MODEL_CHARS, parse_json_object
from llm_gateway.errors import GatewayError, InvalidRequest
from llm_gateway.ingress import Ask
from llm_gateway.tokens import (
    IMAGE_TOKENS_HIGH,
    INLINE_BYTES,
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    count_text_tokens,
    in_thread,
)

# The client's headers that belong to the Messages wire format: passed to an Anthropic upstream.
WIRE_HEADERS = (b"anthropic-version", b"anthropic-beta")
_HEADER_MAX = 1024


def check_messages_body(body: dict[str, Any], *, counting: bool = False) -> None:
    """The top-level checks every Messages request passes, whatever its route (`counting`: a
    `count_tokens` body, which has no `max_tokens` nor `stream`)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' must be at most {MAX_MODEL_CHARS} characters",
                             param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    if counting:
        return
    if not _positive_int(body.get("max_tokens")):
        raise InvalidRequest("'max_tokens' is required and must be a positive integer",
                             param="max_tokens")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


# Anthropic's error type for each status the gateway answers with: the anthropic SDK's
# `ErrorObject` union and exception classes. That union has no `request_too_large` (413 is an
# invalid_request_error there) and no `conflict_error`; other 4xx are invalid requests, other
# 5xx (502 included) `api_error`.
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(exc: GatewayError, request_id: str | None = None) -> bytes:
    """`exc` in Anthropic's shape (send it with `exc.status` and `exc.headers`, which hold a
    429's Retry-After). Anthropic's error has no `param`: it leads the message instead."""
    message = f"{exc.param}: {exc.message}" if exc.param else exc.message
    body: dict[str, Any] = {"type": "error", "error": {
        "type": anthropic_error_type(exc.status), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return orjson.dumps(body)


def anthropic_error_event(exc: GatewayError) -> bytes:
    return b"event: error\ndata: " + anthropic_error_body(exc) + b"\n\n"


def count_message_tokens(body: dict[str, Any], count_text: Callable[[str], int]) -> int:
    """The prompt tokens of a Messages body, for `count_tokens` and limits on routes whose
    upstream cannot count them: `system`, the JSON of `tools`, and every block (an image at
    core/tokens.py's high-detail estimate), with OpenAI's per-message overhead. Thinking blocks
    are not counted: these routes drop them. Run it in a counting thread for large bodies."""
    total = REPLY_PRIMING
    system = body.get("system")
    if isinstance(system, str) and system:
        total += TOKENS_PER_MESSAGE + count_text(system)
    elif isinstance(system, list) and system:
        total += TOKENS_PER_MESSAGE + _blocks_tokens(system, count_text)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += count_text(orjson.dumps(tools).decode())
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        role, content = message.get("role"), message.get("content")
        if isinstance(role, str):
            total += count_text(role)
        if isinstance(content, str):
            total += count_text(content)
        elif isinstance(content, list):
            total += _blocks_tokens(content, count_text)
    return total


def _blocks_tokens(blocks: list[Any], count_text: Callable[[str], int]) -> int:
    total = 0
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            total += count_text(block["text"])
        elif kind == "image":
            total += IMAGE_TOKENS_HIGH
        elif kind == "tool_use":
            name = block.get("name")
            total += count_text(name) if isinstance(name, str) else 0
            total += count_text(orjson.dumps(block.get("input")).decode())
        elif kind == "tool_result":
            content = block.get("content")
            if isinstance(content, str):
                total += count_text(content)
            elif isinstance(content, list):
                total += _blocks_tokens(content, count_text)
    return total


async def count_messages_prompt(body: dict[str, Any], encoding: str, size: int) -> int:
    """`count_message_tokens` with the limits' tokenizer, in a counting thread when the body
    (`size` bytes) is large."""
    if size <= INLINE_BYTES:
        return _count_with(body, encoding)
    return await in_thread(_count_with, body, encoding)


def _count_with(body: dict[str, Any], encoding: str) -> int:
    return count_message_tokens(body, partial(count_text_tokens, encoding_name=encoding))


def wire_headers(request: Request) -> tuple[tuple[str, str], ...]:
    """The client's Messages headers (`WIRE_HEADERS`), when short and printable."""
    out: list[tuple[str, str]] = []
    for name in WIRE_HEADERS:
        value = request.get_first_header(name)
        if value and len(value) <= _HEADER_MAX and value.isascii():
            text = value.decode()
            if text.isprintable():
                out.append((name.decode(), text))
    return tuple(out)


def anthropic_error_response(exc: GatewayError) -> Response:
    headers = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    return Response(exc.status, headers, Content(b"application/json", anthropic_error_body(exc)))


@dataclass(frozen=True, slots=True)
class MessagesIngress:
    """`POST /v1/messages`. Bound per request to the client's `anthropic-version` and
    `anthropic-beta` headers (`with_headers`), which an Anthropic upstream receives."""

    headers: tuple[tuple[str, str], ...] = ()
    wire = "anthropic.messages"
    endpoint = "messages"

    def with_headers(self, request: Request) -> MessagesIngress:
        headers = wire_headers(request)
        return MessagesIngress(headers) if headers else self

    def parse(self, raw: bytes, max_depth: int) -> Ask:
        body = parse_json_object(raw, max_depth)
        check_messages_body(body)
        return Ask(model=body["model"], stream=body.get("stream") is True,
                   max_output_tokens=body["max_tokens"], wants_usage=True, body=body, raw=raw,
                   headers=self.headers)

    async def count_prompt(self, ask: Ask, encoding: str) -> int:
        return await count_messages_prompt(ask.body, encoding, len(ask.raw))

    def error_response(self, exc: GatewayError) -> Response:
        return anthropic_error_response(exc)

    def stream_error(self, exc: GatewayError) -> bytes:
        return anthropic_error_event(exc)


MESSAGES = MessagesIngress()
