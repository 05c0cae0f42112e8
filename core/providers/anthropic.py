"""OpenAI Chat Completions <-> Anthropic Messages API.

Request: system and developer messages become `system`; consecutive same-role messages merge
(Anthropic requires alternation); `max_tokens` is always set; tools, tool calls, tool results,
images (base64 and URL), `stop` and `user` are translated. `temperature` is passed as is
(Anthropic's range is 0..1, so 1..2 comes back as the upstream's 400), and so is the non-OpenAI
`top_k` extension. Dropped, having no Anthropic equivalent: `n`, `logprobs`, `top_logprobs`,
`presence_penalty`, `frequency_penalty`, `logit_bias`, `seed`, `response_format`,
`reasoning_effort`, `service_tier`, `store`, `metadata`, `modalities`, `audio`, `prediction`,
`web_search_options`, `stream_options`, `functions`/`function_call`, message `name`, tool
`strict` and image `detail`. `tool_choice` is dropped when there are no tools (Anthropic refuses
it then).

Response and stream: text blocks become `content`, `tool_use` blocks `tool_calls`; thinking and
server-tool blocks have no Chat Completions field and are skipped.

Translation runs again on each retry and failover target, so it never mutates the body.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import (
    UPSTREAM_MESSAGE_MAX,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
    clip,
)
from llm_gateway.providers.base import (
    MAX_TOKENS,
    Counter,
    Headers,
    UpstreamRequest,
    token_count,
    upstream_json,
)
from llm_gateway.providers.sse import DONE, ChunkEncoder, FrameSplitter, completion_id, data_json

if TYPE_CHECKING:
    from llm_gateway.ingress import Ask

ANTHROPIC_VERSION = "2023-06-01"
# pause_turn: a server tool loop paused; what came so far is the answer the client can use.
# refusal: Anthropic's safety classifier stopped the reply, which is what content_filter means.
FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}


class AnthropicProvider:
    name = "anthropic"
    announces_prompt = False

    def __init__(self, default_max_tokens: int = 4096) -> None:
        self.default_max_tokens = default_max_tokens

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None, headers: Headers = ()) -> UpstreamRequest:
        sent = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
                "accept-encoding": "identity"}
        if api_key:
            sent["x-api-key"] = api_key
        payload = to_messages_request(body, target.model, self.default_max_tokens, stream)
        return UpstreamRequest(f"{target.base_url.rstrip('/')}/v1/messages", sent,
                               orjson.dumps(payload))

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        message = upstream_json(content)
        completion, usage = to_chat_completion(message, client_model)
        return orjson.dumps(completion), usage

    def stream_translator(self, client_model: str, client_wants_usage: bool, count: Counter, *,
                          ask: Ask | None = None, prompt_tokens: int = 0) -> AnthropicStream:
        return AnthropicStream(client_model, client_wants_usage, count)

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        etype, message = None, None
        try:
            err = orjson.loads(content).get("error")
            if isinstance(err, dict):
                etype, message = err.get("type"), err.get("message")
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return map_anthropic_error(status, etype if isinstance(etype, str) else None,
                                   str(message or f"HTTP {status}"), headers)


def map_anthropic_error(status: int, etype: str | None, message: str,
                        headers: dict[str, str] | None = None) -> GatewayError:
    """By Anthropic's error type when the body has one, else by status; never by message text.

    401/403/404 are the gateway's configuration (its key, its target model), not the client's
    fault: 502, and retryable so failover can try the next target and the breaker sees it.
    The message of a server-side failure is never relayed (it may hold anything the upstream's
    internals wrote); a 4xx message passes through cut to 1 KiB.
    """
    kind = etype or _TYPE_BY_STATUS.get(status)
    if status >= 500 or kind in _SERVER_SIDE:
        message = _SERVER_SIDE.get(kind or "") or f"failed with status {status}"
    else:
        message = clip(message, UPSTREAM_MESSAGE_MAX)
    text = f"upstream provider (anthropic): {message}"
    if kind == "invalid_request_error":
        return InvalidRequest(text, code="invalid_request")
    if kind in ("authentication_error", "permission_error"):
        return UpstreamError("upstream provider (anthropic) rejected the gateway's credentials",
                             code="upstream_authentication_error", retryable=True)
    if kind == "not_found_error":
        return UpstreamError(text, code="upstream_model_not_found", retryable=True)
    if kind == "request_too_large":
        return PayloadTooLarge(text)
    if kind == "rate_limit_error":
        retry_after = (headers or {}).get("retry-after")
        return RateLimited(text, code="upstream_rate_limited", retryable=True,
                           headers={"retry-after": retry_after} if retry_after else None)
    if kind == "overloaded_error":
        return ServiceUnavailable(text, code="upstream_overloaded", retryable=True)
    if kind == "timeout_error":
        return UpstreamTimeout(text, retryable=True)
    # api_error, unknown types, and bodies we could not read: the upstream failed us.
    return UpstreamError(text, code="upstream_error", retryable=status >= 500)


# Server-side failures, by type: what the client is told instead of the upstream's own text.
_SERVER_SIDE = {"api_error": "", "overloaded_error": "Overloaded", "timeout_error": "Timed out"}

# For bodies without a type. Not 400: a 400 that is not Anthropic's JSON came from something in
# between (a proxy), so it says nothing the client could fix.
_TYPE_BY_STATUS = {
    401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 504: "timeout_error", 529: "overloaded_error",
}


def to_messages_request(body: dict[str, Any], model: str, default_max_tokens: int,
                        stream: bool = False) -> dict[str, Any]:
    """The Messages API request for a Chat Completions body (which is left untouched)."""
    system, messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"model": model, "messages": messages,
                           "max_tokens": _max_tokens(body, default_max_tokens)}
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = _stop_sequences(stop)
    if stream:
        out["stream"] = True
    if body.get("tools"):
        out["tools"] = [_tool(t, i) for i, t in enumerate(body["tools"])]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str):
        out["metadata"] = {"user_id": user}
    return out


def _messages(raw: Any) -> tuple[list[str], list[dict[str, Any]]]:
    if not isinstance(raw, list):
        raise InvalidRequest("'messages' must be an array", param="messages")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            if text := _plain_text(m.get("content"), i):
                system.append(text)
            continue
        if role == "user":
            blocks = _blocks(m.get("content"), i)
        elif role == "assistant":
            blocks = _blocks(m.get("content"), i) + _tool_uses(m.get("tool_calls"), i)
        elif role == "tool":
            role, blocks = "user", [_tool_result(m, i)]
        else:
            raise InvalidRequest(f"messages[{i}].role {role!r} is not supported by this model",
                                 param=f"messages[{i}].role")
        if not blocks:  # Anthropic refuses empty content; dropping keeps alternation intact
            continue
        if messages and messages[-1]["role"] == role:
            _merge(messages[-1]["content"], blocks)
        else:
            messages.append({"role": role, "content": blocks})
    return system, messages


def _merge(into: list[dict[str, Any]], blocks: list[dict[str, Any]]) -> None:
    """Appends, except that tool results go before other user content: Anthropic wants them
    first in the message that follows the tool calls."""
    if blocks[0]["type"] != "tool_result":
        into.extend(blocks)
        return
    at = next((k for k, b in enumerate(into) if b["type"] != "tool_result"), len(into))
    into[at:at] = blocks


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer", param=name)
        return value
    return default


def _stop_sequences(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise InvalidRequest("'stop' must be a string or an array of strings", param="stop")


def _plain_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    blocks = _blocks(content, i)
    if any(b["type"] != "text" for b in blocks):
        raise InvalidRequest("system messages may only contain text",
                             param=f"messages[{i}].content")
    return "\n".join(b["text"] for b in blocks)


def _blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or an array of parts",
                             param=f"messages[{i}].content")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            if text := part.get(kind):  # empty text blocks are refused upstream
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), f"messages[{i}].content[{j}]"))
        else:
            raise InvalidRequest(f"content part type {kind!r} is not supported by this model",
                                 param=f"messages[{i}].content[{j}].type")
    return blocks


def _image(image_url: Any, param: str) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    param += ".image_url.url"
    if not isinstance(url, str):
        raise InvalidRequest("image_url.url must be a string", param=param)
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type, _, encoding = header[5:].partition(";")
        if encoding != "base64" or not media_type or not data:
            raise InvalidRequest("image data URLs must be data:<mime>;base64,<data>", param=param)
        return {"type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest("image_url.url must be an http(s) or base64 data URL", param=param)


def _tool_uses(calls: Any, i: int) -> list[dict[str, Any]]:
    out = []
    for j, call in enumerate(calls or ()):
        param = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise InvalidRequest("only function tool calls are supported by this model",
                                 param=param)
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest("tool call arguments must be a JSON object",
                                 param=f"{param}.function.arguments")
        out.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                    "input": arguments})
    return out


def _tool_result(m: dict[str, Any], i: int) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.get("tool_call_id")}
    content = m.get("content")
    if isinstance(content, str):
        if content:
            result["content"] = content
    elif blocks := _blocks(content, i):
        result["content"] = blocks
    return result


def _tool(t: Any, i: int) -> dict[str, Any]:
    fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
    if not isinstance(fn, dict) or not fn.get("name"):
        raise InvalidRequest("tools must be functions with a name", param=f"tools[{i}]")
    tool = {"name": fn["name"]}
    if fn.get("description"):
        tool["description"] = fn["description"]
    # Anthropic requires a schema; OpenAI allows none for a function without parameters.
    tool["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return tool


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}  # takes no disable_parallel_tool_use
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and choice["function"].get("name"):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise InvalidRequest("unsupported tool_choice", param="tool_choice")
    if out is not None and parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _int(value: Any) -> int:
    """An optional usage number (the cache fields): 0 unless a valid count."""
    return token_count(value) or 0


def _usage(u: Any) -> Usage:
    """Anthropic's input_tokens excludes cached tokens; OpenAI's prompt_tokens includes them.
    Reported only when input_tokens and output_tokens are valid counts."""
    u = u if isinstance(u, dict) else {}
    cached = _int(u.get("cache_read_input_tokens"))
    given = token_count(u.get("input_tokens"))
    prompt = min((given or 0) + _int(u.get("cache_creation_input_tokens")) + cached, MAX_TOKENS)
    output = token_count(u.get("output_tokens"))
    reported = given is not None and output is not None
    return Usage(prompt if given is not None else 0, output or 0, cached, reported=reported)


def _openai_usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def to_chat_completion(message: dict[str, Any], client_model: str
                       ) -> tuple[dict[str, Any], Usage]:
    texts, calls = [], []
    blocks = message.get("content")
    for block in blocks if isinstance(blocks, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": arguments}})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None,
                             "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    usage = _usage(message.get("usage"))
    if not usage.reported:
        usage.generated = (*texts, *(c["function"][k] for c in calls for k in ("name", "arguments")
                                     if isinstance(c["function"][k], str)))
    message_id = message.get("id")
    completion = {
        "id": completion_id(message_id if isinstance(message_id, str) else None),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": client_model,
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": _finish_reason(message.get("stop_reason"))}],
        "usage": _openai_usage(usage),
    }
    return completion, usage


class AnthropicStream:
    """Anthropic stream events -> `chat.completion.chunk` events, one event at a time.

    `error` is set when the upstream sent an `error` event (or ended before saying anything),
    for the relay to record; the client has then already been sent the error frame.
    """

    def __init__(self, client_model: str, client_wants_usage: bool, count: Counter) -> None:
        self._split = FrameSplitter()
        self._chunks = ChunkEncoder(client_model)
        self._wants_usage = client_wants_usage
        self._input: dict[str, Any] = {}  # the latest input-side usage fields reported
        self._output: int | None = None  # set by message_delta only: the final count
        self._finish: str | None = None
        self._tool_index: dict[Any, int] = {}  # Anthropic block index -> OpenAI tool index
        self.generated = count()  # counted when the upstream never says
        self._started = False
        self._ended = False
        self.error: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        frames = self._split.feed(chunk)
        if len(frames) == 1:
            return self._event(frames[0])
        return b"".join([self._event(f) for f in frames])

    def finish(self) -> bytes:
        rest = self._split.rest()
        tail = self._event(rest) if rest else b""
        if not self._ended:
            tail += self._stop() if self._started else self._fail(
                UpstreamError("upstream provider (anthropic) ended the stream without a message",
                              code="upstream_incomplete_stream", retryable=True))
        return tail + DONE

    def _event(self, frame: bytes) -> bytes:
        data = data_json(frame)
        if self._ended or not isinstance(data, dict):
            return b""
        kind = data.get("type")
        if kind == "content_block_delta":
            return self._delta(data)
        if kind == "content_block_start":
            return self._block_start(data)
        if kind == "message_start":
            message = data.get("message") or {}
            self._started = True
            if isinstance(message.get("id"), str):
                self._chunks.set_id(completion_id(message["id"]))
            usage = message.get("usage")
            if isinstance(usage, dict):
                self._input.update(usage)
            return self._chunks.delta({"role": "assistant", "content": ""})
        if kind == "message_delta":
            self._finish = _finish_reason((data.get("delta") or {}).get("stop_reason"))
            usage = data.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            # Usage here is cumulative; newer API versions repeat the input side too.
            self._input.update({k: v for k, v in usage.items() if k != "output_tokens"
                                and v is not None})
            output = token_count(usage.get("output_tokens"))
            if output is not None:
                self._output = output
                self.generated.discard()
            return b""
        if kind == "message_stop":
            return self._stop()
        if kind == "error":
            err = data.get("error") or {}
            # The response already began with 200; an untyped error is the upstream's fault.
            return self._fail(map_anthropic_error(
                500, err.get("type"), str(err.get("message") or "stream error")))
        return b""  # ping, content_block_stop, and event types added later

    def _delta(self, data: dict[str, Any]) -> bytes:
        delta = data.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text") or ""
            self.generated.add(text)
            return self._chunks.content(text)
        if kind == "input_json_delta":
            part = delta.get("partial_json") or ""
            self.generated.add(part)
            index = self._tool_index.get(data.get("index"), 0)
            return self._chunks.delta({"tool_calls": [
                {"index": index, "function": {"arguments": part}}]})
        return b""  # thinking and signature deltas have no Chat Completions field

    def _block_start(self, data: dict[str, Any]) -> bytes:
        block = data.get("content_block") or {}
        if block.get("type") != "tool_use":
            return b""
        index = self._tool_index.setdefault(data.get("index"), len(self._tool_index))
        self.generated.add(str(block.get("name") or ""))
        return self._chunks.delta({"tool_calls": [
            {"index": index, "id": block.get("id"), "type": "function",
             "function": {"name": block.get("name"), "arguments": ""}}]})

    def _stop(self) -> bytes:
        self._ended = True
        out = self._chunks.delta({}, self._finish or "stop")
        if self._wants_usage:
            usage = self.usage()
            if self._output is None:  # rare: the upstream never said; bounded, see OutputTally
                usage.output_tokens = self.generated.count()
            out += self._chunks.usage(_openai_usage(usage))
        return out

    def _fail(self, error: GatewayError) -> bytes:
        self._ended = True
        self.error = error
        return b"data: " + error.body() + b"\n\n"

    def usage(self) -> Usage:
        """The reported usage; without an output count, `generated` has to be counted."""
        return _usage({**self._input, "output_tokens": self._output})
