"""Server-Sent Events helpers shared by the provider adapters.

These run once per upstream chunk, so they avoid regexes and re-encoding constant bytes:

- `FrameSplitter` turns socket chunks (split anywhere, `\\n`, `\\r\\n` or `\\r` line ends) into
  whole events;
- `frame_data` / `data_json` read an event's `data` field;
- `ChunkEncoder` writes `chat.completion.chunk` frames that share one id/created/model;
- `sse_data`, `completion_id` and `DONE` are the small pieces around them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def completion_id(suffix: str | None = None) -> str:
    """An OpenAI-style completion id, built from the upstream's own id when there is one."""
    return "chatcmpl-" + (suffix or uuid.uuid4().hex)


def sse_data(obj: Any) -> bytes:
    """One `data:` event carrying `obj` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class FrameSplitter:
    """Splits an SSE byte stream into whole events (without their blank-line terminator).

    Bytes after the last complete event are kept for the next `feed`; the search for the next
    terminator resumes where the previous one stopped, so a large event arriving in many small
    chunks is not rescanned from its start each time.
    """

    __slots__ = ("_buf", "_cr", "_scanned")

    def __init__(self) -> None:
        self._buf = b""
        self._scanned = 0
        self._cr = False  # the last chunk ended in "\r": its "\n" may be in the next one

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        frames: list[bytes] = []
        start = 0
        # A terminator can straddle the old and new bytes: step back one byte.
        at = buf.find(b"\n\n", max(0, self._scanned - 1))
        while at >= 0:
            frame = buf[start:at]
            if frame.strip():
                frames.append(frame.lstrip(b"\n") if frame[:1] == b"\n" else frame)
            start = at + 2
            at = buf.find(b"\n\n", start)
        self._buf = buf[start:] if start else buf
        self._scanned = len(self._buf)
        return frames

    def rest(self) -> bytes:
        """An unterminated last event, if the stream ended without a blank line."""
        rest = self._buf.strip()
        self._buf, self._scanned, self._cr = b"", 0, False
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
