"""Fake OpenAI and Anthropic upstreams for tests, benchmarks and demos.

One aiohttp server speaks both wire formats on one port:

    POST /v1/chat/completions   OpenAI Chat Completions (stream, include_usage, tool calls)
    GET  /v1/models             OpenAI model list
    POST /v1/messages           Anthropic Messages (x-api-key or Bearer key, and
                                anthropic-version, required)
    POST /v1/responses          OpenAI Responses (stream with event: lines, function calls,
                                usage with cached and reasoning details); kept unless
                                `store` is false (the last 1000)
    GET|DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel   a kept response
    POST /v1/embeddings         OpenAI Embeddings: one deterministic 8-dimension vector per
                                input, `encoding_format` float or base64; prompt_tokens = the
                                words of string inputs, the ids of token inputs
    POST /v1/messages/count_tokens  Anthropic's count: {"input_tokens": the prompt tokens}

The reply is deterministic: `chunks` words "word0 word1 ...", capped by `max_tokens` /
`max_completion_tokens` (then finish_reason "length" / stop_reason "max_tokens"). With `tools`
in the request the reply is a call of the first tool with arguments `{"input": "<the words>"}`.
Each streamed content delta is one word; completion/output tokens = number of words.

Prompt/input tokens = sum over messages of (1 + words in the message's text) + words in the
Anthropic `system` field (OpenAI system messages are ordinary messages), where "words" are the
whitespace-separated words of every string content, every `text` part, and (recursively) every
Anthropic `tool_result` content.

A control API under /_control/ scripts faults, changes the knobs, and exposes what arrived:

    POST /_control/faults    {"faults": [...]}  appended to a FIFO; each completion/messages
                             request pops one. Kinds: {"kind": "status", "status": 500,
                             "retry_after": 1?}, {"kind": "drop_after", "chunks": 3},
                             {"kind": "hang"}, {"kind": "delay", "ms": 500}. drop_after
                             counts SSE events (data: lines), whatever their kind.
    POST /_control/config    any of latency_ms, ttft_ms, chunk_interval_ms, chunks
    GET  /_control/config    the knobs in force
    POST /_control/reset     clear faults, requests and events; restore the CLI defaults
    GET  /_control/requests  recorded requests: method, path, headers, body, at
    GET  /_control/events    {"event": "client_disconnected", "path", "at", "chunks_sent"}
    GET  /_control/health    {"ok": true}

The server must run with aiohttp's `handler_cancellation=True` (as `main` does), so that a
client going away cancels the handler at once and is recorded as an event.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import uvloop
from aiohttp import web

MODELS = ("gpt-4o-mini", "gpt-4o", "fake-claude", "fake-model")
FAULT_KINDS = ("status", "drop_after", "hang", "delay")
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    529: "overloaded_error",
}
OPENAI_ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error"}


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    """The knobs; milliseconds for delays, words per reply for `chunks`."""

    latency_ms: int = 0
    ttft_ms: int = 0
    chunk_interval_ms: int = 0
    chunks: int = 8

    def updated(self, changes: Any) -> FakeConfig:
        if not isinstance(changes, dict):
            raise ValueError("expected a JSON object of knobs")
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown knob {key!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer")
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 500
    retry_after: int | None = None
    chunks: int = 0
    ms: int = 0

    @classmethod
    def parse(cls, raw: Any) -> Fault:
        if not isinstance(raw, dict) or raw.get("kind") not in FAULT_KINDS:
            raise ValueError(f"a fault needs a kind among {FAULT_KINDS}: {raw!r}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"bad fault {raw!r}: {exc}") from None


@dataclasses.dataclass
class State:
    defaults: FakeConfig
    config: FakeConfig
    faults: deque[Fault] = dataclasses.field(default_factory=deque)
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stored: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def keep(self, body: dict[str, Any], response: dict[str, Any]) -> None:
        if body.get("store") is not False:
            self.stored[response["id"]] = response
            while len(self.stored) > 1000:
                del self.stored[next(iter(self.stored))]


STATE = web.AppKey("state", State)


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the fake model answers to one request."""

    words: list[str]
    capped: bool
    prompt_tokens: int
    tool_name: str | None

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def arguments(self) -> str:
        return json.dumps({"input": self.text})

    def argument_fragments(self) -> list[str]:
        # OpenAI and Anthropic both cut tool arguments at arbitrary points, so do we.
        args = self.arguments
        size = max(1, -(-len(args) // max(2, len(self.words))))
        return [args[i : i + size] for i in range(0, len(args), size)]


class _Dropped(Exception):
    """We aborted the connection ourselves (a drop_after fault)."""


def _count_words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_count_words(part) for part in content)
    if isinstance(content, dict):
        return _count_words(content.get("text")) + _count_words(content.get("content"))
    return 0


def plan_reply(body: dict[str, Any], config: FakeConfig) -> Reply:
    messages = body.get("messages") or []
    prompt = sum(1 + _count_words(m.get("content")) for m in messages if isinstance(m, dict))
    prompt += _count_words(body.get("system"))
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    n = config.chunks if cap is None else min(config.chunks, int(cap))
    tools = body.get("tools") or []
    tool = tools[0] if tools else None
    name = None
    if isinstance(tool, dict):
        name = tool.get("function", {}).get("name") if "function" in tool else tool.get("name")
    return Reply([f"word{i}" for i in range(n)], n < config.chunks, prompt, name or None)


class SseWriter:
    """Writes SSE events, pacing content deltas and honouring a drop_after fault."""

    def __init__(self, request: web.Request, config: FakeConfig, drop_after: int | None) -> None:
        self.request = request
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self.interval = config.chunk_interval_ms / 1000
        self.drop_after = drop_after
        self.sent = 0
        self.deltas = 0

    async def send(self, data: dict[str, Any] | str, *, named: bool = False,
                   delta: bool = False) -> None:
        """Write one event; `named` adds Anthropic's `event:` line, `delta` paces it."""
        if delta and self.deltas and self.interval:
            await asyncio.sleep(self.interval)
        if self.drop_after is not None and self.sent >= self.drop_after:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise _Dropped
        if not self.response.prepared:
            await self.response.prepare(self.request)
        payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        head = f"event: {data['type']}\n" if named and isinstance(data, dict) else ""
        await self.response.write(f"{head}data: {payload}\n\n".encode())
        self.sent += 1
        self.deltas += delta


def openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = OPENAI_ERROR_TYPES.get(status, "invalid_request_error"), None
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def anthropic_error(status: int, message: str,
                    headers: dict[str, str] | None = None) -> web.Response:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


async def _openai_stream(out: SseWriter, reply: Reply, body: dict[str, Any]) -> None:
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": body.get("model"), "system_fingerprint": None}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    if reply.tool_name:
        call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": reply.tool_name, "arguments": ""}}
        await out.send(chunk({"role": "assistant", "content": None, "tool_calls": [call]}))
        for fragment in reply.argument_fragments():
            part = {"index": 0, "function": {"arguments": fragment}}
            await out.send(chunk({"tool_calls": [part]}), delta=True)
    else:
        await out.send(chunk({"role": "assistant", "content": ""}))
        for i, word in enumerate(reply.words):
            await out.send(chunk({"content": word if i == 0 else f" {word}"}), delta=True)
    await out.send(chunk({}, _finish_reason(reply)))
    if (body.get("stream_options") or {}).get("include_usage"):
        await out.send({**base, "choices": [], "usage": _openai_usage(reply)})
    await out.send("[DONE]")


def _finish_reason(reply: Reply) -> str:
    return "length" if reply.capped else "tool_calls" if reply.tool_name else "stop"


def _openai_usage(reply: Reply) -> dict[str, int]:
    done = len(reply.words)
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": done,
            "total_tokens": reply.prompt_tokens + done}


def _openai_completion(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if reply.tool_name:
        message["content"] = None
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": reply.tool_name,
                                               "arguments": reply.arguments}}]
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": _finish_reason(reply)}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model"), "choices": [choice],
            "usage": _openai_usage(reply), "system_fingerprint": None}


def _stop_reason(reply: Reply) -> str:
    return "max_tokens" if reply.capped else "tool_use" if reply.tool_name else "end_turn"


def _anthropic_usage(reply: Reply, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": reply.prompt_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _anthropic_message(reply: Reply, body: dict[str, Any], done: bool) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if done and reply.tool_name:
        content = [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                    "name": reply.tool_name, "input": {"input": reply.text}}]
    elif done:
        content = [{"type": "text", "text": reply.text}]
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": body.get("model"), "content": content,
            "stop_reason": _stop_reason(reply) if done else None, "stop_sequence": None,
            # Like the real API, message_start announces one output token.
            "usage": _anthropic_usage(reply, len(reply.words) if done else 1)}


async def _anthropic_stream(out: SseWriter, reply: Reply, body: dict[str, Any]) -> None:
    start = _anthropic_message(reply, body, done=False)
    await out.send({"type": "message_start", "message": start}, named=True)
    await out.send({"type": "ping"}, named=True)
    if reply.tool_name:
        block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                 "name": reply.tool_name, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": f}
                  for f in reply.argument_fragments()]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": w if i == 0 else f" {w}"}
                  for i, w in enumerate(reply.words)]
    await out.send({"type": "content_block_start", "index": 0, "content_block": block},
                   named=True)
    for delta in deltas:
        await out.send({"type": "content_block_delta", "index": 0, "delta": delta},
                       named=True, delta=True)
    await out.send({"type": "content_block_stop", "index": 0}, named=True)
    await out.send({"type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(reply), "stop_sequence": None},
                    "usage": {"output_tokens": len(reply.words)}}, named=True)
    await out.send({"type": "message_stop"}, named=True)


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


async def _record(request: web.Request) -> dict[str, Any] | None:
    body = await _read_json(request)
    request.app[STATE].requests.append({
        "method": request.method, "path": request.path,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body, "at": time.time(),
    })
    return body if isinstance(body, dict) else None


async def _fault_first(request: web.Request, fault: Fault | None, stream: bool,
                       error: Callable[..., web.Response]) -> web.Response | None:
    """What the next fault does before any reply: hang (until the client leaves), wait longer,
    or answer with its status (returned). None: go on and reply."""
    config = request.app[STATE].config
    if fault and fault.kind == "hang":
        await asyncio.Event().wait()  # until handler cancellation says the client left
    first_byte_ms = config.ttft_ms if stream else config.latency_ms
    first_byte_ms += fault.ms if fault and fault.kind == "delay" else 0
    await asyncio.sleep(first_byte_ms / 1000)
    if fault and fault.kind == "status":
        retry = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        return error(fault.status, f"scripted fault: status {fault.status}", retry)
    return None


def _client_left(request: web.Request, out: SseWriter) -> None:
    request.app[STATE].events.append({"event": "client_disconnected", "path": request.path,
                                      "at": time.time(), "chunks_sent": out.sent})


async def _respond(
    request: web.Request, body: dict[str, Any], anthropic: bool
) -> web.StreamResponse:
    """Apply the next fault, then answer in the endpoint's format; record a client going away."""
    state = request.app[STATE]
    config = state.config
    fault = state.faults.popleft() if state.faults else None
    error = anthropic_error if anthropic else openai_error
    reply = plan_reply(body, config)
    stream = bool(body.get("stream"))
    out = SseWriter(request, config, fault.chunks if fault and fault.kind == "drop_after" else None)
    try:
        if (scripted := await _fault_first(request, fault, stream, error)) is not None:
            return scripted
        if not stream:
            if out.drop_after is not None and request.transport is not None:
                request.transport.abort()
                return web.Response()  # aiohttp ignores it: the connection is gone
            message = (_anthropic_message(reply, body, done=True) if anthropic
                       else _openai_completion(reply, body))
            return web.json_response(message)
        await (_anthropic_stream if anthropic else _openai_stream)(out, reply, body)
        await out.response.write_eof()
        return out.response
    except _Dropped:
        return out.response
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        _client_left(request, out)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return out.response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _record(request)
    if body is None:
        return openai_error(400, "request body must be a JSON object")
    if not isinstance(body.get("messages"), list) or not body.get("model"):
        return openai_error(400, "'model' and 'messages' are required")
    return await _respond(request, body, anthropic=False)


async def messages(request: web.Request) -> web.StreamResponse:
    body = await _record(request)
    # anthropic SDK 2.x sends the key as a Bearer token; older clients send x-api-key.
    bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not (request.headers.get("x-api-key") or bearer):
        return anthropic_error(401, "x-api-key or Authorization: Bearer header is required")
    if not request.headers.get("anthropic-version"):
        return anthropic_error(400, "anthropic-version header is required")
    if body is None:
        return anthropic_error(400, "request body must be a JSON object")
    for field in ("model", "messages", "max_tokens"):
        if field not in body:
            return anthropic_error(400, f"{field}: Field required")
    return await _respond(request, body, anthropic=True)


def plan_responses_reply(body: dict[str, Any], config: FakeConfig) -> Reply:
    """`plan_reply` for a Responses body: input items count as messages (1 + their words),
    `instructions` as words, `max_output_tokens` caps the reply, the first function tool is
    called."""
    items = body.get("input")
    items = [{"content": items}] if isinstance(items, str) else items or []
    prompt = sum(1 + _count_words(i.get("content") or i.get("output") or i.get("arguments"))
                 for i in items if isinstance(i, dict))
    prompt += _count_words(body.get("instructions"))
    cap = body.get("max_output_tokens")
    n = config.chunks if cap is None else min(config.chunks, int(cap))
    tools = [t for t in body.get("tools") or () if isinstance(t, dict)
             and t.get("type") == "function"]
    name = tools[0].get("name") if tools else None
    return Reply([f"word{i}" for i in range(n)], n < config.chunks, prompt, name or None)


def _responses_usage(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    """Cached input = the words of `instructions` (a stable prefix, as a prompt cache would
    hit); reasoning = 2 tokens (within output_tokens) when the request has `reasoning`."""
    reasoning = 2 if body.get("reasoning") else 0
    output = len(reply.words) + reasoning
    return {"input_tokens": reply.prompt_tokens,
            "input_tokens_details": {"cached_tokens": _count_words(body.get("instructions")),
                                     "cache_write_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": reply.prompt_tokens + output}


def _responses_items(reply: Reply, done: bool) -> list[dict[str, Any]]:
    status = "completed" if done else "in_progress"
    if reply.tool_name:
        return [{"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status,
                 "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": reply.tool_name,
                 "arguments": reply.arguments if done else ""}]
    part = {"type": "output_text", "text": reply.text if done else "", "annotations": [],
            "logprobs": []}
    return [{"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
             "status": status, "content": [part] if done else []}]


def _responses_object(reply: Reply, body: dict[str, Any], done: bool) -> dict[str, Any]:
    status = ("incomplete" if reply.capped else "completed") if done else "in_progress"
    tools = body.get("tools") or []
    return {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
            "created_at": int(time.time()), "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if done and reply.capped
            else None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": body.get("model"),
            "output": _responses_items(reply, done) if done else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "tool_choice": body.get("tool_choice", "auto"), "tools": tools,
            "usage": _responses_usage(reply, body) if done else None,
            "metadata": body.get("metadata") or {}}


async def _responses_stream(out: SseWriter, reply: Reply,
                            body: dict[str, Any]) -> dict[str, Any]:
    seq = iter(range(1 << 30))
    response = _responses_object(reply, body, done=False)

    async def send(kind: str, paced: bool = False, **fields: Any) -> None:
        await out.send({"type": kind, "sequence_number": next(seq), **fields}, named=True,
                       delta=paced)

    await send("response.created", response=response)
    await send("response.in_progress", response=response)
    item = _responses_items(reply, done=False)[0]
    at = {"item_id": item["id"], "output_index": 0}
    await send("response.output_item.added", output_index=0, item=item)
    if reply.tool_name:
        for fragment in reply.argument_fragments():
            await send("response.function_call_arguments.delta", True, **at, delta=fragment)
        await send("response.function_call_arguments.done", **at, arguments=reply.arguments)
        done = {**item, "status": "completed", "arguments": reply.arguments}
    else:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await send("response.content_part.added", **at, content_index=0, part=part)
        for i, word in enumerate(reply.words):
            await send("response.output_text.delta", True, **at, content_index=0,
                       delta=word if i == 0 else f" {word}", logprobs=[])
        await send("response.output_text.done", **at, content_index=0, text=reply.text,
                   logprobs=[])
        part = {**part, "text": reply.text}
        await send("response.content_part.done", **at, content_index=0, part=part)
        done = {**item, "status": "completed", "content": [part]}
    await send("response.output_item.done", output_index=0, item=done)
    final = {**_responses_object(reply, body, done=True), "id": response["id"],
             "output": [done]}
    await send(f"response.{final['status']}", response=final)
    return final


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses (OpenAI Responses): faults as for chat completions; the reply is the
    same words, as a message or a call of the first function tool."""
    body = await _record(request)
    if body is None or not body.get("model") or not isinstance(body.get("input"), str | list):
        return openai_error(400, "'model' and 'input' are required")
    state = request.app[STATE]
    fault = state.faults.popleft() if state.faults else None
    reply = plan_responses_reply(body, state.config)
    stream = bool(body.get("stream"))
    out = SseWriter(request, state.config,
                    fault.chunks if fault and fault.kind == "drop_after" else None)
    try:
        if (scripted := await _fault_first(request, fault, stream, openai_error)) is not None:
            return scripted
        if not stream:
            if out.drop_after is not None and request.transport is not None:
                request.transport.abort()
                return web.Response()
            response = _responses_object(reply, body, done=True)
            state.keep(body, response)
            return web.json_response(response)
        state.keep(body, await _responses_stream(out, reply, body))
        await out.response.write_eof()
        return out.response
    except _Dropped:
        return out.response
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        _client_left(request, out)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return out.response


EMBEDDING_DIMENSIONS = 8


def fake_embedding(item: Any) -> list[float]:
    """A deterministic unit-ish vector for one input (a string or a list of token ids)."""
    seed = sum(ord(c) for c in item) if isinstance(item, str) else sum(item) + len(item)
    return [((seed * (i + 3)) % 97) / 97.0 for i in range(EMBEDDING_DIMENSIONS)]


async def embeddings(request: web.Request) -> web.Response:
    body = await _record(request)
    if body is None or not body.get("model") or "input" not in body:
        return openai_error(400, "'model' and 'input' are required")
    fault = request.app[STATE].faults.popleft() if request.app[STATE].faults else None
    if fault and fault.kind == "status":
        retry = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        return openai_error(fault.status, f"scripted fault: status {fault.status}", retry)
    raw = body["input"]
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in items)
    data = []
    for n, item in enumerate(items):
        vector: Any = fake_embedding(item)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": n, "embedding": vector})
    return web.json_response({"object": "list", "data": data, "model": body["model"],
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def count_tokens(request: web.Request) -> web.Response:
    body = await _record(request)
    if not (request.headers.get("x-api-key") or request.headers.get("authorization")):
        return anthropic_error(401, "x-api-key or Authorization: Bearer header is required")
    if body is None or "model" not in body or "messages" not in body:
        return anthropic_error(400, "model and messages are required")
    reply = plan_reply(body, request.app[STATE].config)
    return web.json_response({"input_tokens": reply.prompt_tokens})


async def stored_response(request: web.Request) -> web.Response:
    """GET, DELETE or cancel (POST) a kept response."""
    await _record(request)
    stored = request.app[STATE].stored
    response_id = request.match_info["response_id"]
    response = stored.get(response_id)
    if response is None:
        return openai_error(404, f"Response with id '{response_id}' not found.")
    if request.method == "DELETE":
        del stored[response_id]
        return web.json_response({"id": response_id, "object": "response.deleted",
                                  "deleted": True})
    if request.method == "POST":
        response = stored[response_id] = {**response, "status": "cancelled"}
    return web.json_response(response)


async def list_models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"}
            for m in MODELS]
    return web.json_response({"object": "list", "data": data})


def _bad_request(exc: ValueError) -> web.Response:
    return web.json_response({"error": str(exc)}, status=400)


async def control_faults(request: web.Request) -> web.Response:
    body = await _read_json(request)
    try:
        if not isinstance(body, dict) or not isinstance(body.get("faults"), list):
            raise ValueError('expected {"faults": [...]}')
        faults = [Fault.parse(raw) for raw in body["faults"]]
    except ValueError as exc:
        return _bad_request(exc)
    request.app[STATE].faults.extend(faults)
    return web.json_response({"queued": len(request.app[STATE].faults)})


async def control_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.method == "POST":
        try:
            state.config = state.config.updated(await _read_json(request))
        except ValueError as exc:
            return _bad_request(exc)
    return web.json_response(dataclasses.asdict(state.config))


async def control_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.faults.clear()
    state.requests.clear()
    state.events.clear()
    state.config = state.defaults
    return web.json_response({"ok": True})


async def control_recorded(request: web.Request) -> web.Response:
    state = request.app[STATE]
    recorded = {"requests": state.requests, "events": state.events}
    return web.json_response(recorded[request.match_info["what"]])


async def control_health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def build_app(config: FakeConfig) -> web.Application:
    """The fake upstream app; run it with handler_cancellation=True."""
    app = web.Application()
    app[STATE] = State(defaults=config, config=config)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/v1/responses/{response_id}", stored_response)
    app.router.add_delete("/v1/responses/{response_id}", stored_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", stored_response)
    app.router.add_post("/_control/faults", control_faults)
    app.router.add_get("/_control/config", control_config)
    app.router.add_post("/_control/config", control_config)
    app.router.add_post("/_control/reset", control_reset)
    app.router.add_get("/_control/{what:requests|events}", control_recorded)
    app.router.add_get("/_control/health", control_health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fake-upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    for field in dataclasses.fields(FakeConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    args = parser.parse_args(argv)
    config = FakeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FakeConfig)})
    web.run_app(build_app(config), host=args.host, port=args.port, access_log=None,
                handler_cancellation=True, loop=uvloop.new_event_loop(),
                print=lambda _: print(f"fake upstream on http://{args.host}:{args.port}",
                                      flush=True))


if __name__ == "__main__":
    main()
