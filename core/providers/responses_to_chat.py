"""OpenAI Responses (the client's format) <-> OpenAI Chat Completions (the upstream's).

Used for targets that do not speak Responses: `self-hosted` directly, and `anthropic` composed
with the Chat Completions <-> Messages adapter (`anthropic.py`): Responses -> chat -> Messages,
and back. `target_provider` tells the request translation what the composition cannot express
(Anthropic has no `response_format`, and its adapter applies its own `max_tokens` default when
`max_output_tokens` is absent, so that stays absent here).

Request: `instructions` and system/developer messages become system messages; message items,
`function_call` items (consecutive calls merge into one assistant message: parallel calls) and
`function_call_output` items become chat messages; `reasoning` items are dropped (their
encrypted content means nothing to another model). Function tools, `tool_choice`,
`max_output_tokens`, `temperature`, `top_p`, `parallel_tool_calls`, `user` (or
`safety_identifier`) and `text.format` are translated. Built-in tools (web search, file search,
computer use, code interpreter, MCP, ...) run inside OpenAI and have no equivalent: 400 naming
the tool. Ignored: `store` (nothing is stored: a translated response cannot be fetched later),
`include`, `reasoning`, `truncation`, `service_tier`, `max_tool_calls`, `top_logprobs`,
`prompt_cache_key`, `text.verbosity`, `stream_options`; `metadata` is only echoed.

`previous_response_id` (and `conversation`, `prompt`, item references) get 400 "send the whole
input": continuing a response needs a conversation store in the gateway, holding every tenant's
prompts and replies, isolated per tenant, with a TTL and a size bound, in each store backend.
Codex and the SDKs' stateless use send the whole input anyway, so the store would cost more than
it serves; an `openai` target keeps the feature (its requests pass through untouched).
`background: true` gets 400 too: there is nothing to poll.

Response and stream: the reply becomes a `message` item (`output_text`, or `refusal`) and one
`function_call` item per tool call, in that order; finish reason `length` gives status
`incomplete` with reason `max_output_tokens` (`content_filter` likewise). The stream emits the
Responses event sequence, one item at a time (an item is closed before the next opens), each
event framed as `event: <type>` and `data: <json>` with an increasing `sequence_number`, and no
`[DONE]`. A failure inside the stream ends it with `response.failed` and a generic message.

Translation runs again on each retry and failover target, so it never mutates its input.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from llm_gateway.domain import Usage
from llm_gateway.errors import GatewayError, InvalidRequest, UpstreamError, clip
from llm_gateway.providers.base import Counter, StreamTranslator, Tally, token_count
from llm_gateway.providers.openai import STREAM_ERROR_MESSAGE, usage_of
from llm_gateway.providers.sse import FrameSplitter, data_json, frame_data

# The accumulated output of one streamed response (the protocol repeats all of it in the final
# event), bounded like a non-stream body (`GATEWAY_MAX_RESPONSE_BYTES`' default).
MAX_OUTPUT_BYTES = 32 * 1024 * 1024
_ROLES = ("user", "assistant", "system", "developer")
_TOOL_CHOICES = ("auto", "none", "required")
_IMAGE_DETAILS = ("auto", "low", "high")
_STATELESS = "this route's provider does not keep responses: send the whole input instead"


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _ids(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request ------------------------------------------------------------------------------------


def to_chat_request(body: dict[str, Any], upstream_model: str, *, stream: bool,
                    target_provider: str) -> dict[str, Any]:
    """The Chat Completions request for a Responses body (which is left untouched).

    `target_provider` is the route target's provider (`anthropic`, `self-hosted`, `openai`):
    what the target cannot do is refused here with a 400 naming the parameter.
    """
    _refuse_stateful(body)
    anthropic = target_provider == "anthropic"
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    messages.extend(_input_messages(body.get("input"), target_provider))
    out: dict[str, Any] = {"model": upstream_model, "messages": messages}
    tools = [_tool(t, i, anthropic) for i, t in enumerate(_list(body.get("tools"), "tools"))]
    choice = _tool_choice(body.get("tool_choice"))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if tools:  # without tools, chat APIs refuse tool_choice and parallel_tool_calls
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    limit = body.get("max_output_tokens")
    if limit is not None:
        if type(limit) is not int or limit < 1:
            raise _bad("'max_output_tokens' must be a positive integer", "max_output_tokens")
        out["max_tokens"] = limit
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if type(value) not in (int, float):
                raise _bad(f"'{name}' must be a number", name)
            out[name] = value
    user = _optional_str(body, "user") or _optional_str(body, "safety_identifier")
    if user:
        out["user"] = user
    response_format = _response_format(body.get("text"), anthropic)
    if response_format is not None:
        out["response_format"] = response_format
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise _bad("'metadata' must be an object of strings", "metadata")
    if body.get("stream") not in (None, True, False):
        raise _bad("'stream' must be a boolean", "stream")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _refuse_stateful(body: dict[str, Any]) -> None:
    for name in ("previous_response_id", "conversation", "prompt"):
        if body.get(name) is not None:
            raise _bad(f"'{name}' is not supported here: {_STATELESS}", name)
    if body.get("background") not in (None, False):
        raise _bad("'background' responses are not supported by this route's provider: "
                   "send the request without it", "background")


def _list(value: Any, param: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(f"'{param}' must be an array", param)
    return value


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(f"'{name}' must be a string", name)
    return value


def _input_messages(raw: Any, target: str) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise _bad("'input' must be a string or an array of input items", "input")
    messages: list[dict[str, Any]] = []
    calls_open = False  # messages[-1] is an assistant message that tool calls may join
    for i, item in enumerate(raw):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad("input items must be objects", param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, param, target))
            calls_open = messages[-1]["role"] == "assistant"
        elif kind == "function_call":
            call = _call(item, param)
            if calls_open:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                calls_open = True
        elif kind == "function_call_output":
            messages.append(_call_output(item, param, target))
            calls_open = False
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(f"item references are not supported: {_STATELESS}", f"{param}.type")
        else:
            raise _bad(f"input item type {_quote(kind)} is not supported by this route's "
                       "provider", f"{param}.type")
    return messages


def _quote(value: Any) -> str:
    return repr(clip(value)) if isinstance(value, str) else repr(type(value).__name__)


def _message(item: dict[str, Any], param: str, target: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(f"message role {_quote(role)} is not supported", f"{param}.role")
    if role == "developer" and target != "openai":
        role = "system"  # many self-hosted chat templates know no developer role
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad("content must be a string or an array of parts", f"{param}.content")
    parts = [_part(p, role, f"{param}.content[{j}]") for j, p in enumerate(content)]
    kinds = {p["type"] for p in parts}
    if "refusal" in kinds and role != "assistant":
        raise _bad(f"{role} messages may not contain refusals", f"{param}.content")
    if "image_url" in kinds and role != "user":
        raise _bad(f"{role} messages may not contain images", f"{param}.content")
    if role == "user" or "refusal" in kinds:
        return {"role": role, "content": parts}
    return {"role": role, "content": "".join(p["text"] for p in parts)}


def _part(part: Any, role: str, param: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad("text must be a string", f"{param}.text")
        return {"type": "text", "text": text}
    if kind == "refusal":
        refusal = part.get("refusal")
        if not isinstance(refusal, str):
            raise _bad("refusal must be a string", f"{param}.refusal")
        return {"type": "refusal", "refusal": refusal}
    if kind == "input_image":
        return _image(part, param)
    raise _bad(f"content part type {_quote(kind)} is not supported by this route's provider",
               f"{param}.type")


def _image(part: dict[str, Any], param: str) -> dict[str, Any]:
    url = part.get("image_url")
    if url is None and part.get("file_id") is not None:
        raise _bad("images by file_id are not supported by this route's provider: "
                   "send image_url (a URL or a data URL)", f"{param}.file_id")
    if not isinstance(url, str) or not url.startswith(("data:", "https://", "http://")):
        raise _bad("image_url must be an http(s) URL or a data URL", f"{param}.image_url")
    image: dict[str, Any] = {"url": url}
    if part.get("detail") in _IMAGE_DETAILS:
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _call(item: dict[str, Any], param: str) -> dict[str, Any]:
    fields = {}
    for name in ("call_id", "name", "arguments"):
        value = item.get(name)
        if not isinstance(value, str) or (not value and name != "arguments"):
            raise _bad(f"function_call items need a string '{name}'", f"{param}.{name}")
        fields[name] = value
    return {"id": fields["call_id"], "type": "function",
            "function": {"name": fields["name"], "arguments": fields["arguments"]}}


def _call_output(item: dict[str, Any], param: str, target: str) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad("function_call_output items need a string 'call_id'", f"{param}.call_id")
    output = item.get("output")
    if isinstance(output, str):
        return {"role": "tool", "tool_call_id": call_id, "content": output}
    if not isinstance(output, list):
        raise _bad("output must be a string or an array of parts", f"{param}.output")
    parts = [_part(p, "tool", f"{param}.output[{j}]") for j, p in enumerate(output)]
    # Chat tool messages carry text only; the Messages API's tool_result also takes images.
    for j, p in enumerate(parts):
        if p["type"] == "refusal" or (p["type"] == "image_url" and target != "anthropic"):
            raise _bad("this route's provider takes only text in function call outputs",
                       f"{param}.output[{j}].type")
    return {"role": "tool", "tool_call_id": call_id, "content": parts}


def _tool(tool: Any, i: int, anthropic: bool) -> dict[str, Any]:
    param = f"tools[{i}]"
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise _bad(f"tool type {_quote(kind)} is a tool built into OpenAI's platform; this "
                   "route's provider has no equivalent (only function tools are supported)",
                   f"{param}.type")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _bad("function tools need a name", f"{param}.name")
    fn: dict[str, Any] = {"name": name}
    description, parameters, strict = (tool.get(k) for k in ("description", "parameters",
                                                             "strict"))
    if description is not None:
        if not isinstance(description, str):
            raise _bad("a tool description must be a string", f"{param}.description")
        fn["description"] = description
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise _bad("tool parameters must be a JSON schema object", f"{param}.parameters")
        fn["parameters"] = parameters
    if strict is not None:
        if not isinstance(strict, bool):
            raise _bad("'strict' must be a boolean", f"{param}.strict")
        if not anthropic:  # the Messages adapter has no strict mode
            fn["strict"] = strict
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> Any:
    if choice is None or choice in _TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
        raise _bad("tool_choice needs a function name", "tool_choice.name")
    raise _bad("tool_choice must be auto, none, required or a function: this route's "
               "provider has no other kind", "tool_choice")


def _response_format(text: Any, anthropic: bool) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("'text' must be an object", "text")
    fmt = text.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind not in ("json_schema", "json_object"):
        raise _bad(f"text.format type {_quote(kind)} is not supported", "text.format.type")
    if anthropic:
        raise _bad(f"text.format {kind} is not supported by this route's provider "
                   "(anthropic): describe the format in the instructions instead",
                   "text.format")
    if kind == "json_object":
        return {"type": "json_object"}
    name, schema = fmt.get("name"), fmt.get("schema")
    if not isinstance(name, str) or not name:
        raise _bad("a json_schema format needs a name", "text.format.name")
    if not isinstance(schema, dict):
        raise _bad("a json_schema format needs a schema object", "text.format.schema")
    spec: dict[str, Any] = {"name": name, "schema": schema}
    for key, kinds in (("description", str), ("strict", bool)):
        value = fmt.get(key)
        if value is not None:
            if not isinstance(value, kinds):
                raise _bad(f"text.format.{key} has the wrong type", f"text.format.{key}")
            spec[key] = value
    return {"type": "json_schema", "json_schema": spec}


def prompt_view(body: dict[str, Any]) -> dict[str, Any]:
    """A chat-shaped view of any Responses body, for `tokens.count_prompt_tokens` and
    `tokens.reservation` (`max_output_tokens` as `max_tokens`), on every target, `openai`
    included: it never raises, and what it cannot read (built-in tool items, references)
    counts as nothing."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    raw = body.get("input")
    for item in [{"role": "user", "content": raw}] if isinstance(raw, str) else (
            raw if isinstance(raw, list) else ()):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": str(item.get("role")),
                             "content": _view_content(item.get("content"))})
        elif kind == "function_call":
            messages.append({"role": "assistant", "tool_calls": [{"function": {
                "name": item.get("name"), "arguments": item.get("arguments")}}]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": _view_content(item.get("output"))})
    view: dict[str, Any] = {"messages": messages}
    if isinstance(body.get("tools"), list):
        view["tools"] = body["tools"]
    limit = body.get("max_output_tokens")
    if type(limit) is int and limit > 0:
        view["max_tokens"] = limit
    return view


def _view_content(content: Any) -> Any:
    if not isinstance(content, list):
        return content if isinstance(content, str) else ""
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            parts.append({"type": "input_image", "detail": part.get("detail")})
    return parts


# -- response -----------------------------------------------------------------------------------


def response_head(request: dict[str, Any], client_model: str,
                  response_id: str | None = None) -> dict[str, Any]:
    """A `response` object without `status`, `output` and `usage`: the fields that echo the
    request (already checked by `to_chat_request`), as OpenAI returns them."""
    tools = []
    for t in request.get("tools") or ():
        tool = {"type": "function", "name": t["name"], "parameters": t.get("parameters"),
                "strict": t.get("strict")}
        if t.get("description") is not None:
            tool["description"] = t["description"]
        tools.append(tool)
    text = request.get("text")
    text = {"format": {"type": "text"}, **text} if isinstance(text, dict) else None
    if text is not None and text.get("format") is None:
        text["format"] = {"type": "text"}
    parallel = request.get("parallel_tool_calls")
    return {
        "id": response_id or _ids("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "metadata": request.get("metadata") or {},
        "model": client_model,
        "parallel_tool_calls": True if parallel is None else parallel,
        "previous_response_id": None,
        "temperature": request.get("temperature"),
        "text": text or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": tools,
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "user": request.get("user"),
    }


def _status(finish_reason: Any) -> tuple[str, dict[str, Any] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _usage(raw: Any) -> Usage:
    """Chat usage, with the reasoning tokens OpenAI's reasoning models report."""
    usage = usage_of(raw)
    if usage.reported:
        details = raw.get("completion_tokens_details")
        reasoning = token_count(details.get("reasoning_tokens")) if isinstance(
            details, dict) else None
        usage.reasoning_tokens = min(reasoning or 0, usage.output_tokens)
    return usage


def usage_object(usage: Usage) -> dict[str, Any] | None:
    """The Responses `usage` for a reported usage (None when the upstream reported none)."""
    if not usage.reported:
        return None
    return {"input_tokens": usage.input_tokens,
            # The chat usage a translation reads has no cache-write count.
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.input_tokens + usage.output_tokens}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _upstream_bad(what: str) -> UpstreamError:
    return UpstreamError(f"the upstream provider returned an invalid response ({what})")


def to_response(chat: dict[str, Any], client_model: str, *, request: dict[str, Any],
                response_id: str | None = None) -> tuple[dict[str, Any], Usage]:
    """A `chat.completion` -> a Responses `response` object, and the usage to settle.

    `request` is the client's Responses body (checked by `to_chat_request`), for the fields a
    response echoes. Values the upstream got wrong are a 502, never a crash.
    """
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _upstream_bad("no message")
    content, refusal = message.get("content"), message.get("refusal")
    if not isinstance(content, str | None) or not isinstance(refusal, str | None):
        raise _upstream_bad("content")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _upstream_bad("tool_calls")
    status, incomplete = _status(choice.get("finish_reason"))  # type: ignore[union-attr]
    output: list[dict[str, Any]] = []
    generated: list[str] = []
    if content or refusal or not calls:
        parts = [_text_part(content or "")] if content or not refusal else []
        if refusal:
            parts.append({"type": "refusal", "refusal": refusal})
        output.append({"id": _ids("msg"), "type": "message", "role": "assistant",
                       "status": "completed", "content": parts})
        generated += [content or "", refusal or ""]
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        name, arguments = (fn.get("name"), fn.get("arguments")) if isinstance(
            fn, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise _upstream_bad("tool call")
        call_id = call.get("id")  # type: ignore[union-attr]
        output.append({"id": _ids("fc"), "type": "function_call", "status": "completed",
                       "call_id": call_id if isinstance(call_id, str) and call_id
                       else _ids("call"), "name": name, "arguments": arguments})
        generated += [name, arguments]
    if incomplete:  # the reply was cut in its last item
        output[-1]["status"] = "incomplete"
    usage = _usage(chat.get("usage"))
    if not usage.reported:
        usage.generated = tuple(t for t in generated if t)
    response = {**response_head(request, client_model, response_id), "status": status,
                "incomplete_details": incomplete, "output": output,
                "usage": usage_object(usage)}
    return response, usage


# -- stream -------------------------------------------------------------------------------------


class _Item:
    """The output item being streamed: a message (its parts) or a function call."""

    __slots__ = ("arguments", "call_id", "chat_index", "id", "index", "kind", "name", "part",
                 "parts", "pieces")

    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind
        self.index = index
        self.id = _ids("msg" if kind == "message" else "fc")
        self.parts: list[dict[str, Any]] = []  # a message's finished parts
        self.part: str | None = None  # the open part's type: output_text or refusal
        self.pieces: list[str] = []  # the open part's text, or the call's arguments
        self.call_id = ""
        self.name = ""
        self.chat_index: Any = None

    def snapshot(self, status: str) -> dict[str, Any]:
        if self.kind == "function_call":
            return {"id": self.id, "type": "function_call", "status": status,
                    "call_id": self.call_id, "name": self.name,
                    "arguments": "".join(self.pieces)}
        parts = list(self.parts)
        if self.part is not None:
            parts.append(_part_of(self.part, "".join(self.pieces)))
        return {"id": self.id, "type": "message", "role": "assistant", "status": status,
                "content": parts}


def _part_of(kind: str, text: str) -> dict[str, Any]:
    return _text_part(text) if kind == "output_text" else {"type": "refusal", "refusal": text}


class ChatToResponsesStream:
    """`chat.completion.chunk` SSE bytes (split anywhere) -> Responses SSE events.

    Holds one pending frame, the open item, and the output so far (which `response.completed`
    repeats whole), up to `max_output_bytes`; past that the stream fails. `finish` is called
    when the upstream ended; `fail` when reading it failed (it ends the client's stream with
    `response.failed`). Chat usage needs `stream_options.include_usage`, which
    `to_chat_request` sets.
    """

    def __init__(self, client_model: str, request: dict[str, Any], count: Counter | None, *,
                 response_id: str | None = None,
                 max_output_bytes: int = MAX_OUTPUT_BYTES) -> None:
        self._split = FrameSplitter()
        self._head = response_head(request, client_model, response_id)
        self._max_bytes = max_output_bytes
        self._size = 0
        self._seq = 0
        self._started = False
        self._ended = False
        self._output: list[dict[str, Any]] = []
        self._item: _Item | None = None
        self._closed_calls: set[Any] = set()
        self._finish: Any = None
        self._finished = False
        self._usage: Usage | None = None
        self.generated: Tally = count() if count is not None else NoTally()
        self.error: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        try:
            frames = self._split.feed(chunk)
        except GatewayError as exc:
            return self.fail(exc)
        return b"".join([self._frame(f) for f in frames])

    def finish(self) -> bytes:
        rest = b"" if self._ended else self._frame(self._split.rest())
        if self._ended:
            return rest
        if not self._finished:
            return rest + self.fail(UpstreamError(
                "the upstream provider ended the stream before the reply was complete",
                code="upstream_incomplete_stream", retryable=True))
        return rest + self._complete()

    def usage(self) -> Usage:
        return self._usage if self._usage is not None else Usage()

    def fail(self, error: GatewayError) -> bytes:
        """Ends the stream with `response.failed` (the message is generic: the cause may be
        the upstream's own words); `error` is what the request records."""
        if self._ended:
            return b""
        out = self._start()
        self._ended = True
        self.error = error
        output = list(self._output)
        if self._item is not None:
            output.append(self._item.snapshot("incomplete"))
        response = {**self._head, "status": "failed", "output": output,
                    "error": {"code": "server_error", "message": STREAM_ERROR_MESSAGE},
                    "usage": usage_object(self.usage())}
        return out + self._event("response.failed", response=response)

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self._seq, **fields})
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        response = {**self._head, "status": "in_progress", "output": [], "usage": None}
        return (self._event("response.created", response=response)
                + self._event("response.in_progress", response=response))

    def _frame(self, frame: bytes) -> bytes:
        if self._ended or not frame:
            return b""
        data = data_json(frame)
        if not isinstance(data, dict):
            if frame_data(frame) == b"[DONE]":
                return self._complete()
            return b""
        if "error" in data and "choices" not in data:
            return self.fail(UpstreamError(STREAM_ERROR_MESSAGE))
        out = self._start()
        usage = data.get("usage")
        if isinstance(usage, dict):
            reported = _usage(usage)
            if reported.reported:
                self._usage = reported
                self.generated.discard()
        choices = data.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict) or choice.get("index", 0) != 0 or self._finished:
            return out
        delta = choice.get("delta")
        if isinstance(delta, dict):
            out += self._delta(delta)
            if self._ended:
                return out
        finish = choice.get("finish_reason")
        if finish is not None:
            self._finish, self._finished = finish, True
            out += self._close()
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        """The events of one delta; each step raises before it emits anything, so a failure
        keeps what the earlier steps emitted."""
        out: list[bytes] = []
        try:
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    out.append(self._text(kind, text))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    out.append(self._call(call))
        except GatewayError as exc:
            out.append(self.fail(exc))
        return b"".join(out)

    def _grow(self, text: str) -> None:
        """Counts `text` into the output kept for the final event, or fails past the bound."""
        self._size += len(text.encode())
        if self._size > self._max_bytes:
            raise UpstreamError(f"the reply grew past {self._max_bytes} bytes",
                                code="upstream_response_too_large")

    def _text(self, kind: str, text: str) -> bytes:
        self._grow(text)
        out = b""
        item = self._item
        if item is None or item.kind != "message":
            out += self._close()
            item = self._open("message")
            out += self._event("response.output_item.added", output_index=item.index,
                               item=item.snapshot("in_progress"))
        if item.part != kind:
            out += self._close_part(item)
            item.part = kind
            out += self._event("response.content_part.added", item_id=item.id,
                               output_index=item.index, content_index=len(item.parts),
                               part=_part_of(kind, ""))
        item.pieces.append(text)
        self.generated.add(text)
        fields: dict[str, Any] = {"logprobs": []} if kind == "output_text" else {}
        return out + self._event(f"response.{kind}.delta", item_id=item.id,
                                 output_index=item.index, content_index=len(item.parts),
                                 delta=text, **fields)

    def _call(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index")
        index = index if type(index) is int else 0
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        name, arguments = fn.get("name"), fn.get("arguments")
        self._grow(name if isinstance(name, str) else "")
        self._grow(arguments if isinstance(arguments, str) else "")
        item = self._item
        if item is None or item.kind != "function_call" or item.chat_index != index:
            if index in self._closed_calls:
                raise UpstreamError("the upstream provider interleaved its tool calls")
            out += self._close()
            item = self._open("function_call")
            item.chat_index = index
            call_id = call.get("id")
            item.call_id = call_id if isinstance(call_id, str) and call_id else _ids("call")
            self._name(item, name)
            out += self._event("response.output_item.added", output_index=item.index,
                               item=item.snapshot("in_progress"))
        else:
            self._name(item, name)
        if isinstance(arguments, str) and arguments:
            item.pieces.append(arguments)
            self.generated.add(arguments)
            out += self._event("response.function_call_arguments.delta", item_id=item.id,
                               output_index=item.index, delta=arguments)
        return out

    def _name(self, item: _Item, name: Any) -> None:
        """A call's name: its first non-empty one (sent once, with the call's first delta)."""
        if isinstance(name, str) and name and not item.name:
            item.name = name
            self.generated.add(name)

    def _open(self, kind: str) -> _Item:
        self._item = _Item(kind, len(self._output))
        return self._item

    def _close_part(self, item: _Item) -> bytes:
        if item.part is None:
            return b""
        text = "".join(item.pieces)
        part = _part_of(item.part, text)
        index = len(item.parts)
        if item.part == "output_text":
            out = self._event("response.output_text.done", item_id=item.id,
                              output_index=item.index, content_index=index, text=text,
                              logprobs=[])
        else:
            out = self._event("response.refusal.done", item_id=item.id,
                              output_index=item.index, content_index=index, refusal=text)
        out += self._event("response.content_part.done", item_id=item.id,
                           output_index=item.index, content_index=index, part=part)
        item.parts.append(part)
        item.part, item.pieces = None, []
        return out

    def _close(self) -> bytes:
        """Closes the open item (status from the finish reason, once known)."""
        item = self._item
        if item is None:
            return b""
        status = "incomplete" if self._finished and _status(self._finish)[1] else "completed"
        if item.kind == "message":
            out = self._close_part(item)
        else:
            self._closed_calls.add(item.chat_index)
            out = self._event("response.function_call_arguments.done", item_id=item.id,
                              output_index=item.index, arguments="".join(item.pieces))
        done = item.snapshot(status)
        self._item = None
        self._output.append(done)
        return out + self._event("response.output_item.done", output_index=item.index,
                                 item=done)

    def _complete(self) -> bytes:
        if self._ended:
            return b""
        out = self._start()
        self._finished = True
        if not self._output and self._item is None:  # nothing was said: an empty message
            out += self._text_empty()
        out += self._close()
        self._ended = True
        status, incomplete = _status(self._finish)
        response = {**self._head, "status": status, "incomplete_details": incomplete,
                    "output": self._output, "usage": usage_object(self.usage())}
        return out + self._event(f"response.{status}", response=response)

    def _text_empty(self) -> bytes:
        item = self._open("message")
        item.part = "output_text"
        return (self._event("response.output_item.added", output_index=item.index,
                            item={**item.snapshot("in_progress"), "content": []})
                + self._event("response.content_part.added", item_id=item.id,
                              output_index=item.index, content_index=0,
                              part=_text_part("")))


class NoTally:
    """The tally of a stream whose generated text another translator counts (the second of a
    `ChainedStream`): counting it twice would cost a counting thread for nothing."""

    def add(self, item: str | bytes) -> None:
        return None

    def discard(self) -> None:
        return None

    def full(self) -> bool:
        return False

    async def room(self) -> None:
        return None

    async def total(self) -> int:
        return 0

    def count(self) -> int:
        return 0


class ChainedStream:
    """Two stream translators in a row (upstream -> `first` -> `second` -> client), e.g.
    `AnthropicStream` (client_wants_usage=True) then `ChatToResponsesStream` (count=None).
    Usage and the tally come from `first`, which reads the upstream; its error is the more
    precise one."""

    def __init__(self, first: StreamTranslator, second: ChatToResponsesStream) -> None:
        self.first = first
        self.second = second
        self.generated = first.generated

    @property
    def error(self) -> GatewayError | None:
        return self.first.error or self.second.error

    @error.setter
    def error(self, value: GatewayError | None) -> None:
        self.first.error = value

    def feed(self, chunk: bytes) -> bytes:
        middle = self.first.feed(chunk)
        return self.second.feed(middle) if middle else b""

    def finish(self) -> bytes:
        return self.second.feed(self.first.finish()) + self.second.finish()

    def fail(self, error: GatewayError) -> bytes:
        return self.second.fail(error)

    def usage(self) -> Usage:
        return self.first.usage()
