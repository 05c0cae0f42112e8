"""Server-Sent Events helpers shared by the provider adapters.

These run once per upstream chunk, so they avoid regexes and re-encoding constant bytes:

- `FrameSplitter` turns socket chunks (split anywhere, `\\n`, `\\r\\n` or `\\r` line ends) into
  whole events;
- `frame_data` / `data_json` read an event's `data` field;
- `ChunkEncoder` writes `chat.completion.chunk` frames that share one id/created/model;
- `sse_data`, `sse_event`, `completion_id` and `DONE` are the small pieces around them.

A pending (unterminated) event is held up to `MAX_FRAME_BYTES`; past that the stream ends with
a 502 `upstream_response_too_large` error event, so an upstream cannot grow a worker's memory
by never ending an event.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from llm_gateway.errors import UpstreamError

DONE = b"data: [DONE]\n\n"
MAX_FRAME_BYTES = 1 << 20


def frame_too_large() -> UpstreamError:
    return UpstreamError(
        f"the upstream provider sent a stream event larger than {MAX_FRAME_BYTES} bytes",
        code="upstream_response_too_large")


def completion_id(suffix: str | None = None) -> str:
    """An OpenAI-style completion id, built from the upstream's own id when there is one."""
    return "chatcmpl-" + (suffix or uuid.uuid4().hex)


def sse_data(obj: Any) -> bytes:
    """One `data:` event carrying `obj` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    """One named event (an `event:` line, then `obj` as JSON data), as Anthropic writes them."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class FrameSplitter:
    """Splits an SSE byte stream into whole events (without their blank-line terminator).

    Bytes after the last complete event wait, as a list of chunks, until a chunk brings a
    terminator: a large event arriving in many small chunks is joined once, not once per chunk.
    """

    __slots__ = ("_cr", "_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._cr = False  # the last chunk ended in "\r": its "\n" may be in the next one

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not chunk:
            return []
        if self._parts and b"\n\n" not in chunk and not (
                chunk[:1] == b"\n" and self._parts[-1][-1:] == b"\n"):
            self._hold(chunk)  # no terminator yet: nothing to split
            return []
        buf = b"".join((*self._parts, chunk)) if self._parts else chunk
        self._parts, self._size = [], 0
        frames: list[bytes] = []
        start = 0
        at = buf.find(b"\n\n")
        while at >= 0:
            frame = buf[start:at]
            if frame.strip():
                frames.append(frame.lstrip(b"\n") if frame[:1] == b"\n" else frame)
            start = at + 2
            at = buf.find(b"\n\n", start)
        if start < len(buf):
            self._hold(buf[start:] if start else buf)
        return frames

    def _hold(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_FRAME_BYTES:
            self._parts, self._size = [], 0
            raise frame_too_large()
        self._parts.append(data)

    def rest(self) -> bytes:
        """An unterminated last event, if the stream ended without a blank line."""
        rest = b"".join(self._parts).strip()
        self._parts, self._size, self._cr = [], 0, False
        return rest


def frame_data(frame: bytes) -> bytes | None:
    """The `data` field of one event (several `data:` lines joined with "\\n"), or None."""
    if frame.startswith(b"data:"):
        start = 5
    else:
        start = frame.find(b"\ndata:")
        if start < 0:
            return None
        start += 6
    if frame.find(b"\ndata:", start) >= 0:  # rare: multi-line data
        lines = frame.split(b"\n")
        return b"\n".join(_strip_space(line[5:]) for line in lines if line.startswith(b"data:"))
    end = frame.find(b"\n", start)
    return _strip_space(frame[start:] if end < 0 else frame[start:end])


def _strip_space(value: bytes) -> bytes:
    return value[1:] if value[:1] == b" " else value


def data_json(frame: bytes) -> Any:
    """The event's data parsed as JSON; None for no data, `[DONE]` or invalid JSON."""
    data = frame_data(frame)
    if not data or data == b"[DONE]":
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class ChunkEncoder:
    """Writes the `chat.completion.chunk` frames of one stream (one id, created and model).

    The constant head of every frame is encoded once; a text delta, the most frequent frame,
    is two byte concatenations around one `orjson.dumps` of the text.
    """

    __slots__ = ("_head", "created", "id", "model")

    def __init__(self, model: str, id: str | None = None, created: int | None = None) -> None:
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.id = id or completion_id()
        self._head = self._encode_head()

    def _encode_head(self) -> bytes:
        head = orjson.dumps({"id": self.id, "object": "chat.completion.chunk",
                             "created": self.created, "model": self.model})
        return b"data: " + head[:-1] + b',"choices":'

    def set_id(self, id: str) -> None:
        self.id = id
        self._head = self._encode_head()

    def content(self, text: str) -> bytes:
        return (self._head + b'[{"index":0,"delta":{"content":' + orjson.dumps(text)
                + b'},"logprobs":null,"finish_reason":null}]}\n\n')

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._head + orjson.dumps([choice]) + b"}\n\n"

    def usage(self, usage: dict[str, Any]) -> bytes:
        """The usage-only chunk (`choices: []`) sent when `stream_options.include_usage`."""
        return self._head + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n"
