"""OpenAI Chat Completions <-> Anthropic Messages API.

Request: system and developer messages become `system`; consecutive same-role messages merge
(Anthropic requires alternation); `max_tokens` is always set; tools, tool calls and tool
results, images (base64 and URL), `stop`, `user` are translated. OpenAI fields Anthropic has no
equivalent for (`n`, `logprobs`, `presence_penalty`, `frequency_penalty`, `seed`,
`response_format`, `logit_bias`, ...) are dropped.

Translation runs again on each retry and failover target, so it never mutates the body.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from llm_gateway.providers.base import UpstreamRequest
from llm_gateway.providers.sse import DONE, FrameSplitter, data_json, sse_data

ANTHROPIC_VERSION = "2023-06-01"
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter"}


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, default_max_tokens: int = 4096) -> None:
        self.default_max_tokens = default_max_tokens

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None) -> UpstreamRequest:
        headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
                   "accept-encoding": "identity"}
        if api_key:
            headers["x-api-key"] = api_key
        payload = to_messages_request(body, target.model, self.default_max_tokens)
        return UpstreamRequest(f"{target.base_url.rstrip('/')}/v1/messages", headers,
                               orjson.dumps(payload))

    def parse_response(self, content: bytes, client_model: str) -> tuple[bytes, Usage]:
        try:
            message = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise UpstreamError("the upstream provider returned invalid JSON") from None
        completion, usage = to_chat_completion(message, client_model)
        return orjson.dumps(completion), usage

    def stream_translator(self, client_model: str, client_wants_usage: bool,
                          encoding: str) -> AnthropicStream:
        return AnthropicStream(client_model, client_wants_usage, encoding)

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        etype, message = None, "the upstream provider returned an error"
        try:
            err = orjson.loads(content).get("error")
            if isinstance(err, dict):
                etype, message = err.get("type"), str(err.get("message") or message)
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return map_anthropic_error(status, etype, message, headers)


def map_anthropic_error(status: int, etype: str | None, message: str,
                        headers: dict[str, str] | None = None) -> GatewayError:
    """By status and Anthropic's error type, never by message text."""
    upstream = f"upstream provider (anthropic): {message}"
    if status == 429 or etype == "rate_limit_error":
        after = {"retry-after": headers["retry-after"]} if headers and "retry-after" in headers \
            else {}
        return RateLimited(upstream, code="upstream_rate_limited", headers=after, retryable=True)
    if status == 529 or etype == "overloaded_error":
        return ServiceUnavailable(upstream, code="upstream_overloaded", retryable=True)
    if status in (401, 403) or etype in ("authentication_error", "permission_error"):
        return UpstreamError("the upstream provider rejected the gateway's credentials",
                             code="upstream_authentication_error")
    if status == 404 or etype == "not_found_error":
        return NotFound(upstream, code="model_not_found", param="model")
    if status == 413 or etype == "request_too_large":
        return PayloadTooLarge(upstream)
    if 400 <= status < 500 or etype == "invalid_request_error":
        return InvalidRequest(upstream, code="invalid_request")
    return UpstreamError(upstream, code="upstream_error", retryable=True)


# --- request -------------------------------------------------------------------------------

def to_messages_request(body: dict[str, Any], model: str, default_max_tokens: int
                        ) -> dict[str, Any]:
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body["messages"]):
        role = m["role"]
        if role in ("system", "developer"):
            text = _plain_text(m.get("content"), i)
            if text:
                system.append(text)
            continue
        if role == "tool":
            role, blocks = "user", [_tool_result(m, i)]
        elif role == "assistant":
            blocks = _blocks(m.get("content"), i) + _tool_uses(m.get("tool_calls"), i)
        elif role == "user":
            blocks = _blocks(m.get("content"), i)
        else:
            raise InvalidRequest(f"messages[{i}].role {role!r} is not supported by this model",
                                 param=f"messages[{i}].role")
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
        or default_max_tokens,
    }
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    if body.get("tools"):
        out["tools"] = [_tool(t, i) for i, t in enumerate(body["tools"])]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    return out


def _plain_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(b["text"] for b in _blocks(content, i) if b["type"] == "text")


def _blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), f"messages[{i}].content[{j}]"))
        else:
            raise InvalidRequest(f"content part type {kind!r} is not supported by this model",
                                 param=f"messages[{i}].content[{j}].type")
    return blocks


def _image(image_url: Any, param: str) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise InvalidRequest("image_url.url must be a string", param=f"{param}.image_url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        if ";base64" not in header or not data:
            raise InvalidRequest("image data URLs must be base64", param=f"{param}.image_url")
        return {"type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest("image_url.url must be an http(s) or data URL",
                         param=f"{param}.image_url")


def _tool_uses(calls: Any, i: int) -> list[dict[str, Any]]:
    out = []
    for j, call in enumerate(calls or ()):
        fn = call.get("function") or {}
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            raise InvalidRequest("tool call arguments must be a JSON object",
                                 param=f"messages[{i}].tool_calls[{j}].function.arguments"
                                 ) from None
        out.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                    "input": arguments})
    return out


def _tool_result(m: dict[str, Any], i: int) -> dict[str, Any]:
    content = m.get("content")
    result: Any = content if isinstance(content, str) else _blocks(content, i)
    return {"type": "tool_result", "tool_use_id": m.get("tool_call_id"), "content": result}


def _tool(t: dict[str, Any], i: int) -> dict[str, Any]:
    fn = t.get("function") if isinstance(t, dict) else None
    if not isinstance(fn, dict) or not fn.get("name"):
        raise InvalidRequest("tools must be functions with a name", param=f"tools[{i}]")
    tool = {"name": fn["name"],
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        tool["description"] = fn["description"]
    return tool


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise InvalidRequest("unsupported tool_choice", param="tool_choice")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# --- response ------------------------------------------------------------------------------

def _usage(u: dict[str, Any]) -> Usage:
    cached = int(u.get("cache_read_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + int(u.get("cache_creation_input_tokens") or 0)
    return Usage(input_tokens=prompt + cached, output_tokens=int(u.get("output_tokens") or 0),
                 cached_tokens=cached, reported=True)


def _openai_usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def to_chat_completion(message: dict[str, Any], client_model: str
                       ) -> tuple[dict[str, Any], Usage]:
    texts, calls = [], []
    for block in message.get("content") or ():
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {})
                .decode()}})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        reply["tool_calls"] = calls
    usage = _usage(message.get("usage") or {})
    return {
        "id": "chatcmpl-" + str(message.get("id") or uuid.uuid4().hex),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": client_model,
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(message.get("stop_reason") or "",
                                                         "stop")}],
        "usage": _openai_usage(usage),
    }, usage


class AnthropicStream:
    """Anthropic stream events -> `chat.completion.chunk` events, one event at a time."""

    def __init__(self, client_model: str, client_wants_usage: bool, encoding: str) -> None:
        self._split = FrameSplitter()
        self._wants_usage = client_wants_usage
        self._encoding = encoding
        self._base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
                      "created": int(time.time()), "model": client_model}
        self._input = Usage()
        self._output: int | None = None
        self._finish: str | None = None
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index
        self._generated: list[str] = []
        self._ended = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_data({**self._base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._event(f) for f in self._split.feed(chunk))

    def finish(self) -> bytes:
        tail = b"".join(self._event(f) for f in (self._split.rest(),) if f)
        if not self._ended:
            tail += self._stop()
        return tail + DONE

    def _event(self, frame: bytes) -> bytes:
        data = data_json(frame)
        if not isinstance(data, dict) or self._ended:
            return b""
        kind = data.get("type")
        if kind == "message_start":
            self._input = _usage((data.get("message") or {}).get("usage") or {})
            self._base["id"] = "chatcmpl-" + str((data.get("message") or {}).get("id")
                                                 or uuid.uuid4().hex)
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") != "tool_use":
                return b""
            index = self._tool_index.setdefault(int(data.get("index", 0)), len(self._tool_index))
            self._generated.append(str(block.get("name") or ""))
            return self._chunk({"tool_calls": [{"index": index, "id": block.get("id"),
                                                "type": "function", "function": {
                                                    "name": block.get("name"),
                                                    "arguments": ""}}]})
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta":
                self._generated.append(delta.get("text") or "")
                return self._chunk({"content": delta.get("text") or ""})
            if delta.get("type") == "input_json_delta":
                part = delta.get("partial_json") or ""
                self._generated.append(part)
                index = self._tool_index.get(int(data.get("index", 0)), 0)
                return self._chunk({"tool_calls": [{"index": index,
                                                    "function": {"arguments": part}}]})
            return b""
        if kind == "message_delta":
            self._finish = FINISH_REASONS.get((data.get("delta") or {}).get("stop_reason") or "",
                                              "stop")
            usage = data.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self._output = int(usage["output_tokens"])
            return b""
        if kind == "message_stop":
            return self._stop()
        if kind == "error":
            err = data.get("error") or {}
            mapped = map_anthropic_error(500, err.get("type"), str(err.get("message") or ""))
            self._ended = True
            return sse_data({"error": {"message": mapped.message, "type": mapped.type,
                                       "code": mapped.code, "param": None}})
        return b""  # ping, content_block_stop, anything new

    def _stop(self) -> bytes:
        self._ended = True
        out = self._chunk({}, self._finish or "stop")
        if self._wants_usage:
            out += sse_data({**self._base, "choices": [], "usage": _openai_usage(self.usage())})
        return out

    def usage(self) -> Usage:
        if self._output is not None:
            return Usage(self._input.input_tokens, self._output, self._input.cached_tokens,
                         reported=True)
        from llm_gateway.tokens import count_text_tokens

        generated = count_text_tokens("".join(self._generated), self._encoding)
        return Usage(self._input.input_tokens, generated, self._input.cached_tokens,
                     reported=self._input.reported)
