"""One pipelined RESP2 connection that runs one Lua script: the limiter's per-request hot path.

coredis spends about 280 µs of CPU on each script call here (anyio cancel scopes, a writer and
a reader task, retry and telemetry wrappers: ~770 Python calls per command), about twenty
times the cost of the round trip itself (`perf/bench_limiter.py` measures both; this channel
costs about 40 µs). The limiter runs its script on every request, so on a standalone Redis the
gateway sends EVALSHA over this small protocol instead: every command goes out in the loop
iteration that made it (calls made in the same iteration share one write), replies come back
in order and resolve their callers' futures.
Redis Cluster still goes through coredis (`coredis_scripts`), which routes keys to their nodes.

Any connection error or timeout fails every call in flight with `ConnectionError` (the limiter
turns it into LimiterUnavailable) and drops the connection; the next call reconnects. An error
reply (`-OOM ...`) fails only its own call, with ReplyError, and keeps the connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

CRLF = b"\r\n"


class ReplyError(Exception):
    """Redis answered a command with an error reply (`-ERR ...`)."""

    @property
    def prefix(self) -> str:
        """The error code, e.g. `OOM`: the reply's first word."""
        return str(self).split(" ", 1)[0]

    @property
    def noscript(self) -> bool:
        return self.prefix == "NOSCRIPT"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> Address | None:
        """A `redis://` or `rediss://` URL; None for forms this channel does not speak."""
        u = urlsplit(url)
        if u.scheme not in ("redis", "rediss") or u.query:
            return None
        path = u.path.strip("/")
        if path and not path.isdigit():
            return None
        return cls(u.hostname or "127.0.0.1", u.port or 6379, int(path or 0),
                   unquote(u.username) if u.username else None,
                   unquote(u.password) if u.password else None, u.scheme == "rediss")


def encode(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def _arg(value: str | int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


class _Incomplete(Exception):
    pass


def parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply starting at `pos`: the value (bytes, int, list, None or ReplyError) and
    the position after it. Raises _Incomplete when the buffer ends first."""
    end = buf.find(CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos], bytes(buf[pos + 1:end])
    pos = end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), pos
    if kind == 0x24:  # '$' bulk string
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind == 0x2A:  # '*' array
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x2B:  # '+' simple string
        return line, pos
    if kind == 0x2D:  # '-' error
        return ReplyError(line.decode(errors="replace")), pos
    raise ConnectionError(f"redis: unexpected reply type {chr(kind)!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, channel: ScriptChannel) -> None:
        self.channel = channel
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        waiting = self.channel._waiting
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = parse(buf, pos)
                if not waiting:
                    raise ConnectionError("redis: a reply nobody asked for")
                fut = waiting.popleft()
                if not fut.done():
                    fut.set_result(reply)
        except _Incomplete:
            pass
        except ConnectionError as exc:
            self.channel._fail(exc)
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._fail(ConnectionError(f"redis: connection lost ({exc!r})"))


class ScriptChannel:
    """`await call(keys, args)` runs the script with EVALSHA, loading it on NOSCRIPT."""

    def __init__(self, address: Address, script: str, sha: str, *,
                 timeout_s: float = 0.25) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._script = script.encode()
        self._sha = sha.encode()
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def call(self, keys: list[str], args: list[str | int]) -> Any:
        command = encode(b"EVALSHA", self._sha, b"%d" % len(keys),
                         *(k.encode() for k in keys), *(_arg(a) for a in args))
        reply = await self._send(command)
        if isinstance(reply, ReplyError) and reply.noscript:
            # Not run: loading the script and sending the call again is safe.
            loaded = await self._send(encode(b"SCRIPT", b"LOAD", self._script))
            if isinstance(loaded, ReplyError):
                raise loaded
            reply = await self._send(command)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def ping(self) -> None:
        """Connect (and authenticate) now, and check the server answers."""
        reply = await self._send(encode(b"PING"))
        if reply != b"PONG":
            raise ConnectionError(f"redis: PING answered {reply!r}")

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(ConnectionError("redis: channel closed"))

    async def _send(self, command: bytes) -> Any:
        if self._transport is None:
            await self._connect()
        loop = self._loop
        assert loop is not None
        fut = loop.create_future()
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(command)
        self._waiting.append(fut)
        timer = loop.call_later(self.timeout_s, self._timed_out, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not out:
            return
        if self._transport is None:  # lost in the meantime; its waiters have been failed
            return
        self._transport.write(b"".join(out))

    def _timed_out(self, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            # The reply may still come, and would then answer the wrong caller: start over.
            self._fail(ConnectionError(f"redis: no reply within {self.timeout_s} s"))

    async def _connect(self) -> None:
        if self._connecting is None:
            self._loop = asyncio.get_running_loop()
            self._connecting = self._loop.create_future()
            task = asyncio.ensure_future(self._open())
            task.add_done_callback(self._opened)
        await asyncio.shield(self._connecting)

    def _opened(self, task: asyncio.Task[None]) -> None:
        connecting, self._connecting = self._connecting, None
        assert connecting is not None
        exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if exc is None:
            connecting.set_result(None)
        else:
            connecting.set_exception(exc if isinstance(exc, ConnectionError)
                                     else ConnectionError(f"redis: {exc!r}"))
            connecting.exception()  # retrieved here: waiters may all have given up

    async def _open(self) -> None:
        a = self.address
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if a.tls else None
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _Protocol(self), a.host, a.port, ssl=context),
            self.timeout_s)
        self._transport = transport  # type: ignore[assignment]
        hello = []
        if a.password is not None:
            hello.append(encode(b"AUTH", *([a.username.encode()] if a.username else []),
                                a.password.encode()))
        if a.db:
            hello.append(encode(b"SELECT", b"%d" % a.db))
        for command in hello:
            reply = await self._send(command)
            if isinstance(reply, ReplyError):
                await self.close()
                raise ConnectionError(f"redis: {reply}")

    def _fail(self, exc: Exception) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        self._out = []
        waiting, self._waiting = self._waiting, deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
