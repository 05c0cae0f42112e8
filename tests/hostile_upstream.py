"""A hostile upstream for tests: an aiohttp server whose answer each test scripts in Python.

The project's fake upstream (`core/testing/fake_upstream.py`) speaks each wire format correctly and
injects well-formed faults. This one does what a broken or malicious upstream does: huge bodies,
endless streams, stalled sockets, redirects, usage of 1e25, frames that are not objects. It runs
in a thread of the test process, so a test states the behaviour next to its assertions:

    async def huge(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 200 * 2**20, content_type="application/json")

    with hostile_upstream(huge) as up:
        gw.put_model(name, {"provider": "openai", "base_url": up.openai_base, "model": "m"})

`up.behave(fn)` swaps the handler; `up.received` lists what arrived (method, path, headers,
body), so a test can assert what the gateway sent. Every path and method reaches the handler.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.procs import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HostileUpstream:
    url: str
    handler: Handler
    received: list[Received] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def openai_base(self) -> str:
        return f"{self.url}/v1"

    def behave(self, handler: Handler) -> None:
        self.handler = handler
        self.received.clear()


async def sse(request: web.Request, frames: list[bytes],
              headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Answer with these bytes as an event stream, written one by one."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
    await resp.prepare(request)
    for frame in frames:
        await resp.write(frame)
    await resp.write_eof()
    return resp


def openai_completion(usage: Any = None, content: str = "hi") -> dict[str, Any]:
    """A chat.completion body; `usage` as given (None leaves it out)."""
    body: dict[str, Any] = {
        "id": "chatcmpl-hostile", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


@contextmanager
def hostile_upstream(handler: Handler) -> Iterator[HostileUpstream]:
    port = free_port()
    up = HostileUpstream(f"http://127.0.0.1:{port}", handler)
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def dispatch(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        up.received.append(Received(request.method, request.path,
                                    {k.lower(): v for k, v in request.headers.items()}, body))
        return await up.handler(request)

    async def main() -> None:
        nonlocal stop
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", dispatch)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.get_running_loop().create_future()
        up.loop = asyncio.get_running_loop()
        ready.set()
        try:
            await stop
        finally:
            await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True,
                              name="hostile-upstream")
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the hostile upstream did not start")
    try:
        yield up
    finally:
        assert up.loop is not None and stop is not None
        up.loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)


async def huge_completion(request: web.Request, mib: int) -> web.StreamResponse:
    """A valid chat.completion whose content is `mib` MiB of "x", made as it is written (never
    held in memory) and sent chunked, without Content-Length: only the reader can stop it.
    A reader that stops early ends the writing quietly."""
    head, _, tail = json.dumps(openai_completion(content="@")).encode().partition(b'"@"')
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    block = b"x" * 2**20
    try:
        await resp.write(head + b'"')
        for _ in range(mib):
            await resp.write(block)
        await resp.write(b'"' + tail)
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return resp
