"""Anthropic Messages (the client) <-> OpenAI Chat Completions (`openai`, `self-hosted` upstreams).

Request (`to_chat_request`, after `check_messages_body`):
- `system` (a string, or text blocks joined with a blank line) becomes one system message, and
  so does each message with role `system` (which the SDK's `MessageParam` now allows);
- text and image blocks become content parts (a base64 source a data URL, a `url` source its URL;
  a lone text block stays a plain string, which every self-hosted server reads);
- assistant `tool_use` blocks become `tool_calls`, their input as JSON text;
- user `tool_result` blocks become `tool` messages, put first (OpenAI wants them right after the
  calls): their text joined, `is_error` kept as an "Error: " prefix, their images moved to the
  user message that follows (a tool message takes no images);
- `tools` (input_schema -> parameters), `tool_choice` (auto, any -> required, tool, none;
  `disable_parallel_tool_use` -> `parallel_tool_calls: false`; both dropped without tools, which
  OpenAI refuses), `stop_sequences` -> `stop`, `temperature`, `top_p`, `metadata.user_id` ->
  `user`, `top_k` to self-hosted servers only (OpenAI refuses it);
- `max_tokens` -> `max_completion_tokens` for OpenAI (its reasoning models refuse `max_tokens`),
  `max_tokens` for self-hosted servers (vLLM, llama.cpp, Ollama and TGI all read it; some ignore
  `max_completion_tokens`, which would leave the reply, and the TPM reservation, unbounded).
Dropped: `cache_control` (top-level and on blocks) and `citations`, `thinking` and
`redacted_thinking` blocks (their signatures mean nothing to another model), the `thinking`,
`output_config`, `service_tier`, `speed`, `inference_geo`, `diagnostics`, `container`,
`mcp_servers` and `context_management` parameters, and tool fields other than name,
description and input_schema. Refused with 400: document, search-result, server-tool and
container blocks, `file` image sources, and server tools (`type` other than `custom`). A
trailing assistant message (Anthropic's prefill) is sent as history; OpenAI models answer after
it instead of continuing it.

Response and stream: the reply's text becomes a text block (a `refusal` one when there is no
text, with stop_reason `refusal`), tool calls become `tool_use` blocks (arguments that are not a
JSON object become `{}`), `reasoning_content` is dropped. `finish_reason` stop -> `end_turn`
(`tool_use` when there are tool calls; `stop_sequence` only when the upstream names the one it
matched, as vLLM's `stop_reason` and SGLang's `matched_stop` do: OpenAI does not say, so its
replies stopped by a sequence read `end_turn`), length -> `max_tokens`, tool_calls ->
`tool_use`, content_filter -> `refusal`, anything else -> `end_turn`. Usage: Anthropic's
`input_tokens` excludes cached tokens, OpenAI's `prompt_tokens` includes them.

Errors inside the stream are rendered by `llm_gateway.messages_request` (Anthropic's shape).

Translation runs again on each retry and failover target, so it never mutates the body.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from llm_gateway.domain import Target, Usage
from llm_gateway.errors import GatewayError, InvalidRequest, UpstreamError, clip
from llm_gateway.messages_request import anthropic_error_event, check_messages_body
from llm_gateway.providers.base import (
    Counter,
    Headers,
    UpstreamRequest,
    token_count,
    upstream_json,
)
from llm_gateway.providers.openai import (
    STREAM_ERROR_MESSAGE,
    map_openai_error,
    openai_request,
    usage_of,
)
from llm_gateway.providers.sse import FrameSplitter, frame_data, sse_event

if TYPE_CHECKING:
    from llm_gateway.ingress import Ask

MAX_TOKENS_FIELD = {"openai": "max_completion_tokens", "self-hosted": "max_tokens"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
_DROPPED_BLOCKS = frozenset(("thinking", "redacted_thinking"))


class MessagesToChat:
    """The translator for (anthropic.messages, openai.chat): `openai` and `self-hosted`."""

    announces_prompt = True  # message_start carries the prompt's tokens; OpenAI's come last

    def __init__(self, name: str = "openai") -> None:
        self.name = name

    def build_request(self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
                      api_key: str | None, headers: Headers = ()) -> UpstreamRequest:
        payload = to_chat_request(body, target.model, stream=stream, provider=self.name)
        return openai_request(target, "chat/completions", api_key, orjson.dumps(payload))

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        message, usage = to_anthropic_message(upstream_json(content), client_model,
                                              prompt_tokens=prompt_tokens,
                                              stop_sequences=_stops(ask))
        return orjson.dumps(message), usage

    def stream_translator(self, client_model: str, client_wants_usage: bool, count: Counter, *,
                          ask: Ask | None = None,
                          prompt_tokens: int = 0) -> ChatToMessagesStream:
        return ChatToMessagesStream(client_model, prompt_tokens, count,
                                    stop_sequences=_stops(ask))

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        return map_openai_error(status, content, headers)


def _stops(ask: Ask | None) -> tuple[str, ...]:
    stops = ask.body.get("stop_sequences") if ask is not None else None
    return tuple(s for s in stops if isinstance(s, str)) if isinstance(stops, list) else ()


def to_chat_request(body: dict[str, Any], upstream_model: str, *, stream: bool,
                    provider: str = "openai") -> dict[str, Any]:
    """The Chat Completions request for a Messages body (which is left untouched)."""
    check_messages_body(body)
    messages = _system(body.get("system"))
    for i, message in enumerate(body["messages"]):
        messages.extend(_message(message, i))
    out: dict[str, Any] = {"model": upstream_model, "messages": messages,
                           MAX_TOKENS_FIELD[provider]: body["max_tokens"]}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if type(value) not in (int, float):
                raise InvalidRequest(f"'{name}' must be a number", param=name)
            out[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if type(top_k) is not int or top_k < 0:
            raise InvalidRequest("'top_k' must be a non-negative integer", param="top_k")
        if provider == "self-hosted":
            out["top_k"] = top_k
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop_sequences' must be an array of strings",
                                 param="stop_sequences")
        if stop:
            out["stop"] = list(stop)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    choice = _tool_choice(body.get("tool_choice"))
    if tools:
        out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
        out.update(choice)
    user = _user_id(body.get("metadata"))
    if user:
        out["user"] = user
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _quote(value: Any) -> str:
    return repr(clip(value) if isinstance(value, str) else value) if value is not None else "none"


def _unsupported(what: str, kind: Any, param: str) -> InvalidRequest:
    return InvalidRequest(f"{what} type {_quote(kind)} is not supported by this model",
                          param=f"{param}.type")


def _kind(block: Any, param: str) -> Any:
    if not isinstance(block, dict):
        raise InvalidRequest("content blocks must be objects", param=param)
    return block.get("type")


def _text(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest("a text block's 'text' must be a string", param=f"{param}.text")
    return text


def _system(system: Any, param: str = "system") -> list[dict[str, Any]]:
    """The system message for `system`, or for a message with role `system`."""
    if system is None:
        return []
    if isinstance(system, str):
        text = system
    elif isinstance(system, list):
        texts = []
        for j, block in enumerate(system):
            if _kind(block, f"{param}[{j}]") != "text":
                raise _unsupported("system block", block.get("type"), f"{param}[{j}]")
            texts.append(_text(block, f"{param}[{j}]"))
        text = "\n\n".join(t for t in texts if t)
    else:
        raise InvalidRequest("system content must be a string or an array of text blocks",
                             param=param)
    return [{"role": "system", "content": text}] if text else []


def _message(message: Any, i: int) -> list[dict[str, Any]]:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequest("each message must be an object", param=param)
    role, content = message.get("role"), message.get("content")
    if role == "system":
        return _system(content, f"{param}.content")
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"role {_quote(role)} is not supported; use 'user', 'assistant' "
                             "or 'system'", param=f"{param}.role")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or an array of content blocks",
                             param=f"{param}.content")
    if role == "user":
        return _user_turn(content, param)
    return _assistant_turn(content, param)


def _parts_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts


def _user_turn(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []  # the tool messages first, then the user's own
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{param}.content[{j}]"
        kind = _kind(block, at)
        if kind == "text":
            if text := _text(block, at):
                parts.append({"type": "text", "text": text})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_result":
            tool_message, images = _tool_result(block, at)
            out.append(tool_message)
            parts.extend(images)
        elif kind not in _DROPPED_BLOCKS:
            raise _unsupported("content block", kind, at)
    if parts:
        out.append({"role": "user", "content": _parts_content(parts)})
    return out


def _assistant_turn(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{param}.content[{j}]"
        kind = _kind(block, at)
        if kind == "text":
            if text := _text(block, at):
                parts.append({"type": "text", "text": text})
        elif kind == "tool_use":
            calls.append(_tool_call(block, at))
        elif kind not in _DROPPED_BLOCKS:
            raise _unsupported("content block", kind, at)
    if not parts and not calls:  # only thinking: nothing an OpenAI model can read
        return []
    message: dict[str, Any] = {"role": "assistant",
                               "content": _parts_content(parts) if parts else None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest("an image block needs a 'source' object", param=f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not media or not isinstance(data, str) or not data:
            raise InvalidRequest("a base64 image source needs 'media_type' and 'data' strings",
                                 param=f"{param}.source")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        given = source.get("url")
        if not isinstance(given, str) or not given.startswith(("https://", "http://")):
            raise InvalidRequest("an image source's 'url' must be an http(s) URL",
                                 param=f"{param}.source.url")
        url = given
    else:
        raise _unsupported("image source", kind, f"{param}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _nonempty_str(block: dict[str, Any], name: str, param: str) -> str:
    value = block.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{name}' must be a non-empty string", param=f"{param}.{name}")
    return value


def _tool_call(block: dict[str, Any], param: str) -> dict[str, Any]:
    call_id = _nonempty_str(block, "id", param)
    name = _nonempty_str(block, "name", param)
    arguments = block.get("input")
    if not isinstance(arguments, dict):
        raise InvalidRequest("a tool_use block's 'input' must be an object",
                             param=f"{param}.input")
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}}


def _tool_result(block: dict[str, Any], param: str
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    call_id = _nonempty_str(block, "tool_use_id", param)
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for k, part in enumerate(content):
            at = f"{param}.content[{k}]"
            kind = _kind(part, at)
            if kind == "text":
                texts.append(_text(part, at))
            elif kind == "image":
                images.append(_image(part, at))
            else:
                raise _unsupported("tool_result content", kind, at)
    elif content is not None:
        raise InvalidRequest("a tool_result's content must be a string or an array of blocks",
                             param=f"{param}.content")
    text = "\n".join(t for t in texts if t)
    is_error = block.get("is_error")
    if is_error is True:
        text = f"Error: {text}" if text else "Error"
    elif is_error not in (None, False):
        raise InvalidRequest("'is_error' must be a boolean", param=f"{param}.is_error")
    return {"role": "tool", "tool_call_id": call_id, "content": text}, images


def _tool(tool: Any, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise InvalidRequest("each tool must be an object", param=param)
    if tool.get("type") not in (None, "custom"):
        raise _unsupported("tool", tool.get("type"), param)
    fn: dict[str, Any] = {"name": _nonempty_str(tool, "name", param)}
    description = tool.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise InvalidRequest("a tool's description must be a string",
                                 param=f"{param}.description")
        if description:
            fn["description"] = description
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise InvalidRequest("a tool's input_schema must be an object",
                             param=f"{param}.input_schema")
    fn["parameters"] = schema
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> dict[str, Any]:
    """The request fields for Anthropic's tool_choice (checked even when there are no tools)."""
    if choice is None:
        return {}
    if not isinstance(choice, dict):
        raise InvalidRequest("tool_choice must be an object", param="tool_choice")
    kind = choice.get("type")
    if kind == "none":
        return {"tool_choice": "none"}
    if kind == "auto":
        out: dict[str, Any] = {"tool_choice": "auto"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "tool":
        name = _nonempty_str(choice, "name", "tool_choice")
        out = {"tool_choice": {"type": "function", "function": {"name": name}}}
    else:
        raise InvalidRequest("tool_choice must be of type auto, any, tool or none",
                             param="tool_choice")
    disable = choice.get("disable_parallel_tool_use")
    if disable is True:
        out["parallel_tool_calls"] = False
    elif disable not in (None, False):
        raise InvalidRequest("'disable_parallel_tool_use' must be a boolean",
                             param="tool_choice.disable_parallel_tool_use")
    return out


def _user_id(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object", param="metadata")
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'metadata.user_id' must be a string", param="metadata.user_id")
    return user or None


def anthropic_message_id(upstream_id: Any = None) -> str:
    """A `msg_` id, built from the upstream's own id when it is a short printable string."""
    if isinstance(upstream_id, str) and 0 < len(upstream_id) <= 128 \
            and upstream_id.isascii() and upstream_id.isprintable():
        return "msg_" + upstream_id
    return "msg_" + uuid.uuid4().hex


def _tool_use_id(value: Any) -> str:
    return value if isinstance(value, str) and value else "toolu_" + uuid.uuid4().hex


def _arguments(raw: Any) -> dict[str, Any]:
    """A tool call's input: its arguments if they are a JSON object, else `{}` (never a crash:
    a model may emit anything there)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str) and raw:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {}
        if isinstance(parsed, dict):
            return parsed
    return {}


def _matched_stop(choice: dict[str, Any]) -> Any:
    matched = choice.get("stop_reason")  # vLLM; SGLang says matched_stop
    return matched if matched is not None else choice.get("matched_stop")


def stop_reason(finish_reason: Any, has_tool_calls: bool, matched: Any = None,
                stop_sequences: Sequence[str] = ()) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI finish_reason. Some self-hosted servers say
    "stop" after tool calls; `matched` (the upstream's matched stop string) counts only when
    it is one of the request's `stop_sequences`."""
    reason = STOP_REASONS.get(finish_reason, "end_turn") if isinstance(finish_reason, str) \
        else "end_turn"
    if has_tool_calls and reason == "end_turn":
        return "tool_use", None
    if reason == "end_turn" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return reason, None


def anthropic_usage(usage: Usage) -> dict[str, int]:
    """Anthropic's usage object for the gateway's `Usage` (whose input includes cached)."""
    cached = min(usage.cached_tokens, usage.input_tokens)
    return {"input_tokens": usage.input_tokens - cached, "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _reply_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # a few servers answer with text parts
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def to_anthropic_message(chat: dict[str, Any], client_model: str,
                         message_id: str | None = None, *, prompt_tokens: int = 0,
                         stop_sequences: Sequence[str] = ()) -> tuple[dict[str, Any], Usage]:
    """A `chat.completion` -> (an Anthropic `message`, its usage).

    When the upstream reported no valid usage, the message's input_tokens is `prompt_tokens`
    (the gateway's count), its output_tokens 0, and `Usage.generated` holds the reply's texts:
    count them (off the loop) and set `message["usage"]["output_tokens"]` before sending.
    """
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices \
        and isinstance(choices[0], dict) else {}
    reply = choice.get("message")
    reply = reply if isinstance(reply, dict) else {}
    text = _reply_text(reply.get("content"))
    refusal = reply.get("refusal") if not text and isinstance(reply.get("refusal"), str) else ""
    content: list[dict[str, Any]] = []
    if text or refusal:
        content.append({"type": "text", "text": text or refusal})
    generated = [text or refusal]
    calls = reply.get("tool_calls")
    has_tools = False
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        name = fn.get("name") if isinstance(fn.get("name"), str) else ""
        content.append({"type": "tool_use", "id": _tool_use_id(call.get("id")), "name": name,
                        "input": _arguments(fn.get("arguments"))})
        generated += [name, fn["arguments"] if isinstance(fn.get("arguments"), str) else ""]
        has_tools = True
    reason, sequence = stop_reason(choice.get("finish_reason"), has_tools,
                                   _matched_stop(choice), stop_sequences)
    if refusal and reason == "end_turn":
        reason = "refusal"
    usage = usage_of(chat.get("usage"))
    if not usage.reported:
        reasoning = reply.get("reasoning_content")
        if isinstance(reasoning, str):
            generated.append(reasoning)
        usage = Usage(token_count(prompt_tokens) or 0, 0, 0, reported=False,
                      generated=tuple(g for g in generated if g))
    message = {"id": message_id or anthropic_message_id(chat.get("id")), "type": "message",
               "role": "assistant", "model": client_model, "content": content,
               "stop_reason": reason, "stop_sequence": sequence,
               "usage": anthropic_usage(usage)}
    return message, usage


class ChatToMessagesStream:
    """`chat.completion.chunk` events -> Anthropic's stream events, one event at a time.

    `message_start` goes out with the first upstream event and carries `prompt_tokens` (the
    gateway's count: OpenAI reports usage only at the end); the final `message_delta` carries
    the upstream's usage (or, when it reported none, the count of what was generated). One
    content block is open at a time: text, then each tool call in turn (a block that starts
    closes the one before; a fragment for a tool call already closed is a failure). An upstream
    `{"error": ...}` event, or an end before any `finish_reason` or `[DONE]`, becomes an
    `error` event with a generic message, and `error` is set. `fail(exc)` renders a failure the
    relay met (a cut stream, `FrameSplitter`'s oversized frame) the same way.
    """

    def __init__(self, client_model: str, prompt_tokens: int, count: Counter, *,
                 message_id: str | None = None, stop_sequences: Sequence[str] = ()) -> None:
        self._split = FrameSplitter()
        self._model = client_model
        self._prompt = token_count(prompt_tokens) or 0
        self._id = message_id
        self._stops = tuple(stop_sequences)
        self._started = False
        self._ended = False
        self._block = -1  # the index of the last block opened
        self._open: str | None = None  # its type while it is open
        self._delta_head = b""  # the constant start of its content_block_delta events
        self._tool = -1  # the OpenAI index of the last tool call
        self._tool_id = ""
        self._has_tools = False
        self._refused = False
        self._finish: Any = None
        self._matched: Any = None
        self._usage: Usage | None = None
        self.generated = count()
        self.error: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        frames = self._split.feed(chunk)
        if len(frames) == 1:
            return self._event(frames[0])
        return b"".join([self._event(f) for f in frames])

    def finish(self) -> bytes:
        if self._ended:
            return b""
        rest = self._split.rest()
        out = self._event(rest) if rest else b""
        if self._ended:
            return out
        if self._started and self._finish is not None:
            return out + self._end()
        return out + self.fail(UpstreamError(
            "the upstream provider ended the stream before the reply was complete",
            code="upstream_incomplete_stream", retryable=True))

    def fail(self, exc: GatewayError) -> bytes:
        """The `error` event for `exc`; the stream ends there."""
        if self._ended:
            return b""
        self._ended = True
        self.error = exc
        return anthropic_error_event(exc)

    def usage(self) -> Usage:
        """The reported usage; without it, the prompt count and `generated` to be counted."""
        if self._usage is not None:
            return Usage(self._usage.input_tokens, self._usage.output_tokens,
                         self._usage.cached_tokens, reported=True)
        return Usage(self._prompt, 0, 0, reported=False)

    def _event(self, frame: bytes) -> bytes:
        if self._ended:
            return b""
        data = frame_data(frame)
        if not data:
            return b""
        if data == b"[DONE]":
            return self._end() if self._started else b""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(obj, dict):
            return b""
        if "error" in obj and "choices" not in obj:
            return self.fail(UpstreamError(STREAM_ERROR_MESSAGE))
        out = b"" if self._started else self._start(obj)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            reported = usage_of(usage)
            if reported.reported:
                self._usage = reported
                self.generated.discard()
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                out += self._choice(choice)
        return out

    def _start(self, first: dict[str, Any]) -> bytes:
        self._started = True
        if self._id is None:
            self._id = anthropic_message_id(first.get("id"))
        return sse_event("message_start", {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "model": self._model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self._prompt, "output_tokens": 0,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})

    def _choice(self, choice: dict[str, Any]) -> bytes:
        out = b""
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and self._usage is None:
                self.generated.add(reasoning)
            text = delta.get("content")
            if isinstance(text, str) and text:
                out += self._text(text)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._refused = True
                out += self._text(refusal)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict) and not self._ended:
                    out += self._tool_call(call)
        finish = choice.get("finish_reason")
        if finish is not None:
            self._finish, self._matched = finish, _matched_stop(choice)
        return out

    def _text(self, text: str) -> bytes:
        out = b"" if self._open == "text" else self._open_block(
            {"type": "text", "text": ""}, b"text_delta", b"text")
        if self._usage is None:
            self.generated.add(text)
        return out + self._delta_head + orjson.dumps(text) + b"}}\n\n"

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        index = call.get("index") if type(call.get("index")) is int else None
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        arguments = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
        if index is None:  # a server that numbers nothing: a new id starts a new call
            new = self._open != "tool_use" or (call_id is not None and call_id != self._tool_id)
        elif index == self._tool and self._open == "tool_use":
            new = False
        elif index > self._tool:
            new = True
        else:  # a call whose block was closed: its arguments can no longer be sent
            if not arguments:
                return b""
            return self.fail(UpstreamError(
                "the upstream provider interleaved the arguments of several tool calls",
                code="upstream_interleaved_tool_calls"))
        out = b""
        if new:
            self._tool = index if index is not None else self._tool + 1
            self._tool_id = _tool_use_id(call_id)
            self._has_tools = True
            name = fn["name"] if isinstance(fn.get("name"), str) else ""
            if self._usage is None:
                self.generated.add(name)
            out = self._open_block({"type": "tool_use", "id": self._tool_id, "name": name,
                                    "input": {}}, b"input_json_delta", b"partial_json")
        if arguments:
            if self._usage is None:
                self.generated.add(arguments)
            out += self._delta_head + orjson.dumps(arguments) + b"}}\n\n"
        return out

    def _open_block(self, block: dict[str, Any], delta_type: bytes, field: bytes) -> bytes:
        out = self._close()
        self._block += 1
        self._open = block["type"]
        self._delta_head = (b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                            b'"index":' + str(self._block).encode() + b',"delta":{"type":"'
                            + delta_type + b'","' + field + b'":')
        return out + sse_event("content_block_start", {
            "type": "content_block_start", "index": self._block, "content_block": block})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return sse_event("content_block_stop", {"type": "content_block_stop",
                                                "index": self._block})

    def _end(self) -> bytes:
        self._ended = True
        reason, sequence = stop_reason(self._finish, self._has_tools, self._matched,
                                       self._stops)
        if self._refused and reason == "end_turn":
            reason = "refusal"
        if self._usage is not None:
            usage: dict[str, int] = anthropic_usage(self._usage)
        else:  # rare: the upstream never said; bounded, see OutputTally
            usage = {"output_tokens": self.generated.count()}
        return (self._close()
                + sse_event("message_delta", {"type": "message_delta", "delta": {
                    "stop_reason": reason, "stop_sequence": sequence}, "usage": usage})
                + sse_event("message_stop", {"type": "message_stop"}))
