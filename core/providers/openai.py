"""OpenAI protocol -> OpenAI protocol: OpenAI itself and self-hosted servers (vLLM, llama.cpp,
Ollama's /v1).

This pair stays at the byte level: the request is forwarded with only the model patched (and
`stream_options.include_usage` added, so limits can be reconciled with real usage), and the
response goes back as the upstream sent it. A stream is only looked into where a frame carries
usage; the usage-only frame the gateway asked for is dropped when the client did not ask.
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
    clip,
    error_body,
)
from llm_gateway.providers.base import (
    Counter,
    Headers,
    UpstreamRequest,
    token_count,
    upstream_json,
)
from llm_gateway.providers.sse import (
    DONE,
    MAX_FRAME_BYTES,
    completion_id,
    data_json,
    frame_too_large,
)

if TYPE_CHECKING:
    from llm_gateway.ingress import Ask

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_DONE = DONE.rstrip()  # matched against frames without their blank line


_ERROR_MARKER = b'"error"'
STREAM_ERROR_MESSAGE = "the upstream provider failed during the stream"


def _has_usage(frame: bytes) -> bool:
    return _USAGE_MARKERS[0] in frame or _USAGE_MARKERS[1] in frame


def _usage_at(buf: bytes, pos: int) -> int:
    """Where the first usage marker at or after `pos` is; -1 if none."""
    a, b = buf.find(_USAGE_MARKERS[0], pos), buf.find(_USAGE_MARKERS[1], pos)
    return a if b < 0 else b if a < 0 else min(a, b)


def openai_request(target: Target, path: str, api_key: str | None,
                   payload: bytes) -> UpstreamRequest:
    """A POST to an OpenAI-protocol upstream: `{base_url}/{path}`, JSON, the route's key as
    Bearer (every translator to openai and self-hosted targets sends this)."""
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return UpstreamRequest(f"{target.base_url.rstrip('/')}/{path}", headers, payload)


def with_model(body: dict[str, Any], raw: bytes, model: str) -> bytes:
    """The client's bytes when they already name the target's model, else re-encoded with it."""
    return raw if body.get("model") == model else orjson.dumps({**body, "model": model})


class OpenAIProvider:
    name = "openai"
    announces_prompt = False
    # Self-hosted servers often omit `id`/`created` and stream usage; OpenAI never does.
    fill_missing = False

    def build_request(
        self, target: Target, body: dict[str, Any], raw: bytes, *, stream: bool,
        api_key: str | None, headers: Headers = (),
    ) -> UpstreamRequest:
        wants_usage = stream and not _include_usage(body)
        if body.get("model") == target.model and not wants_usage:
            payload = raw
        else:
            patched = {**body, "model": target.model}
            if wants_usage:
                patched["stream_options"] = {**(body.get("stream_options") or {}),
                                             "include_usage": True}
            payload = orjson.dumps(patched)
        return openai_request(target, "chat/completions", api_key, payload)

    def parse_response(self, content: bytes, client_model: str, *, ask: Ask | None = None,
                       prompt_tokens: int = 0) -> tuple[bytes, Usage]:
        data = upstream_json(content)
        if self.fill_missing and ("id" not in data or "created" not in data):
            data.setdefault("id", completion_id())
            data.setdefault("created", int(time.time()))
            data.setdefault("object", "chat.completion")
            content = orjson.dumps(data)
        usage = usage_of(data.get("usage"))
        if not usage.reported:
            usage.generated = tuple(_reply_texts(data.get("choices")))
        return content, usage

    def stream_translator(
        self, client_model: str, client_wants_usage: bool, count: Counter, *,
        ask: Ask | None = None, prompt_tokens: int = 0,
    ) -> OpenAIStream:
        return OpenAIStream(client_wants_usage, count, self.fill_missing)

    def map_error(self, status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
        return map_openai_error(status, content, headers)


class SelfHostedProvider(OpenAIProvider):
    name = "self-hosted"
    fill_missing = True


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def usage_of(u: Any) -> Usage:
    """OpenAI's usage object; unreported unless both counts are valid numbers."""
    if not isinstance(u, dict):
        return Usage()
    prompt, completion = token_count(u.get("prompt_tokens")), token_count(
        u.get("completion_tokens"))
    if prompt is None or completion is None:
        return Usage()
    details = u.get("prompt_tokens_details")
    cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(prompt, completion, min(cached or 0, prompt), reported=True)


def _reply_texts(choices: Any) -> list[str]:
    """What a reply generated, to count when the upstream did not: the content and tool calls of
    each choice's `message` (a completion) or `delta` (a stream chunk). Anything else is
    skipped, whatever its shape."""
    texts: list[str] = []
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message", choice.get("delta"))
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("content"), str):
            texts.append(message["content"])
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                texts.extend(v for v in (fn.get("name"), fn.get("arguments"))
                             if isinstance(v, str))
    return texts


def _generated_text(blocks: list[bytes]) -> str:
    """The text generated in relayed SSE blocks (run in a counting thread)."""
    texts: list[str] = []
    for block in blocks:
        for frame in block.split(b"\n\n"):
            if not frame.startswith(b"data:") or frame.startswith(_DONE):
                continue
            try:
                data = orjson.loads(frame[5:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict):
                texts.extend(_reply_texts(data.get("choices")))
    return "".join(texts)


class OpenAIStream:
    """Relays OpenAI SSE frames untouched, picking usage out of the frame that carries it.

    Until usage arrives, relayed blocks go to `generated`, which reads and counts them in
    slices off the event loop, in case the upstream never reports it.
    """

    def __init__(self, client_wants_usage: bool, count: Counter, fill_missing: bool) -> None:
        self._client_wants_usage = client_wants_usage
        self._fill_missing = fill_missing
        self._pending: list[bytes] = []  # an unterminated frame, in chunks
        self._pending_size = 0
        self._last = b""  # the last block relayed: whether it ended with [DONE]
        self._usage: Usage | None = None
        self._id: str | None = None
        self._created = 0
        self.generated = count(_generated_text)
        self.error: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._pending:
            tail = self._pending[-1][-3:]
            probe = tail + chunk[:3]
            if b"\n\n" not in chunk and b"\n\r\n" not in chunk and b"\n\n" not in \
                    probe.replace(b"\r\n", b"\n"):
                self._hold(chunk)  # no terminator yet
                return b""
            buf = b"".join((*self._pending, chunk))
            self._pending, self._pending_size = [], 0
        else:
            buf = chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._hold(buf)
            return b""
        out = buf[: end + 2]
        if end + 2 < len(buf):
            self._hold(buf[end + 2:])
        if self._fill_missing:
            out = b"".join(self._frame(f) for f in out.split(b"\n\n") if f)
        elif _USAGE_MARKERS[0] in out or _USAGE_MARKERS[1] in out:
            # Only the frame with the usage is parsed; a block often holds a whole stream.
            if out.startswith(b"\n") or b"\n\n\n" in out:  # frames the split would cut
                out = b"".join(self._frame(f) if _has_usage(f) else f + b"\n\n"
                               for f in out.split(b"\n\n") if f)
            else:
                out = self._parse_usage_frames(out)
        if _ERROR_MARKER in out:
            scrubbed = scrub_stream_errors(out)
            if scrubbed != out and self.error is None:  # recorded as the failure it is
                self.error = UpstreamError(STREAM_ERROR_MESSAGE)
            out = scrubbed
        if self._usage is None:
            self.generated.add(out)
        self._last = out
        return out

    def _parse_usage_frames(self, out: bytes) -> bytes:
        """`out` (whole frames, no run of three newlines) with each frame that holds a usage
        marker put through `_frame`, found by searching the bytes, not splitting every frame."""
        parts: list[bytes] = []
        pos = 0
        while (at := _usage_at(out, pos)) >= 0:
            start = out.rfind(b"\n\n", pos, at)
            start = pos if start < 0 else start + 2
            end = out.find(b"\n\n", at)  # `out` ends with a blank line
            parts.append(out[pos:start])
            parts.append(self._frame(out[start:end]))
            pos = end + 2
        parts.append(out[pos:])
        return b"".join(parts)

    def _hold(self, data: bytes) -> None:
        self._pending_size += len(data)
        if self._pending_size > MAX_FRAME_BYTES:
            self._pending, self._pending_size = [], 0
            raise frame_too_large()
        self._pending.append(data)

    def finish(self) -> bytes:
        rest = b"".join(self._pending)
        tail = self.feed(b"\n\n") if rest.strip() else b""
        self._pending, self._pending_size = [], 0
        if _DONE not in tail and _DONE not in self._last:
            tail += _DONE + b"\n\n"
        return tail

    def _frame(self, frame: bytes) -> bytes:
        if not frame.startswith(b"data:") or frame.startswith(_DONE):
            return frame + b"\n\n"
        try:
            data = orjson.loads(frame[5:])
        except orjson.JSONDecodeError:
            return frame + b"\n\n"
        if not isinstance(data, dict):
            return frame + b"\n\n"
        if isinstance(data.get("usage"), dict):
            usage = usage_of(data["usage"])
            if usage.reported:
                self._usage = usage
                self.generated.discard()
            if not self._client_wants_usage and not data.get("choices"):
                return b""
        if self._fill_missing and ("id" not in data or "created" not in data):
            if self._id is None:
                self._id, self._created = completion_id(), int(time.time())
            data.setdefault("id", self._id)
            data.setdefault("created", self._created)
            data.setdefault("object", "chat.completion.chunk")
            return b"data: " + orjson.dumps(data) + b"\n\n"
        return frame + b"\n\n"

    def usage(self) -> Usage:
        return self._usage if self._usage is not None else Usage()


def scrub_stream_errors(block: bytes) -> bytes:
    """Frames as relayed, with the upstream's own `{"error": ...}` frames replaced by a generic
    one: an error inside a stream has no status to tell a client mistake from a server failure,
    so its text (which may hold anything the server's internals wrote) is never relayed."""
    out: list[bytes] = []
    for frame in block.split(b"\n\n"):
        if not frame:
            continue
        data = data_json(frame) if _ERROR_MARKER in frame else None
        if isinstance(data, dict) and "error" in data and "choices" not in data:
            frame = b"data: " + error_body(STREAM_ERROR_MESSAGE, "upstream_error",
                                           "upstream_error")
        out.append(frame + b"\n\n")
    return b"".join(out)


def map_openai_error(status: int, content: bytes, headers: dict[str, str]) -> GatewayError:
    """Classify by status (and the body's `type`/`code` fields), never by message text.

    A 5xx message is never relayed: a failing server may put anything in it (a connection
    string, a stack trace), so the client gets a generic message with the status. A 4xx message
    tells the client what to fix, and passes through cut to 1 KiB.
    """
    message, etype, code, param = "the upstream provider returned an error", None, None, None
    try:
        err = orjson.loads(content).get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            etype, code, param = err.get("type"), err.get("code"), err.get("param")
    except (orjson.JSONDecodeError, AttributeError):
        pass
    if status >= 500:
        upstream = f"the upstream provider failed with status {status}"
    else:
        upstream = f"upstream provider: {clip(message, UPSTREAM_MESSAGE_MAX)}"
        etype, code, param = (_field(etype), _field(code), _field(param))
    if status == 429:
        retry_after = {"retry-after": headers["retry-after"]} if "retry-after" in headers else {}
        return RateLimited(upstream, code="upstream_rate_limited", headers=retry_after,
                           retryable=True)
    if status in (401, 403):
        # The client's gateway key was fine; the gateway's key for this target was not, so
        # another target may still serve the request.
        return UpstreamError("the upstream provider rejected the gateway's credentials",
                             code="upstream_authentication_error", retryable=True)
    if status == 404:
        # The client's model exists in the gateway: a 404 points at the target's configuration.
        return UpstreamError(upstream, code="upstream_model_not_found", retryable=True)
    if status == 413:
        return PayloadTooLarge(upstream)
    if 400 <= status < 500:
        return InvalidRequest(upstream, code=code or "invalid_request", param=param,
                              type=etype or "invalid_request_error", status=400)
    if status == 503:
        return ServiceUnavailable(upstream, code="upstream_unavailable", retryable=True)
    return UpstreamError(upstream, code="upstream_error", retryable=True)


def _field(value: object) -> str | None:
    """An error's type, code or param as relayed: a short string, or nothing."""
    return clip(value, 64) if isinstance(value, str) and value else None
