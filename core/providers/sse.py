"""Server-Sent Events helpers shared by the provider adapters."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


class FrameSplitter:
    """Splits an SSE byte stream into whole events, however the socket chunked it."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        hold = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # its "\n" may arrive with the next chunk
                buf, hold = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop() + hold
        return [p for p in parts if p.strip()]

    def rest(self) -> bytes:
        """An unterminated last event, if the stream ended without a blank line."""
        rest, self._buf = self._buf.strip(), b""
        return rest


def field(frame: bytes, name: bytes) -> bytes | None:
    """The value of `name:` in one event (multi-line data joined with newlines)."""
    values = [line[len(name) + 1:].removeprefix(b" ")
              for line in frame.split(b"\n") if line.startswith(name + b":")]
    return b"\n".join(values) if values else None


def data_json(frame: bytes) -> Any:
    data = field(frame, b"data")
    if data is None or data == b"[DONE]":
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def sse_data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
