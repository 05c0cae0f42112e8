"""The bare stack: Granian + BlackSheep + aiohttp and nothing else, as a baseline for the gateway.

It parses the JSON body, picks the upstream by `model`, forwards the bytes and relays the reply
(the SSE stream chunk by chunk). No auth, limits, metrics, tracing, usage or retries: whatever
the gateway costs beyond this is the price of its features.

    BARE_UPSTREAMS='{"bench": "http://127.0.0.1:9000/v1"}' \
        python perf/bare_proxy.py --port 8081 --workers 1
    GET /healthz -> 200
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator

import aiohttp
import orjson
from blacksheep import Application, Content, Request, Response, Router, StreamedContent

UPSTREAMS: dict[str, str] = orjson.loads(os.environ.get("BARE_UPSTREAMS", "{}"))
UPSTREAM_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bare"}
JSON = b"application/json"

session: aiohttp.ClientSession | None = None


async def open_session(_: Application) -> None:
    global session
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)


async def close_session(_: Application) -> None:
    if session is not None:
        await session.close()


def _error(status: int, message: str) -> Response:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    return Response(status, None, Content(JSON, body))


async def chat_completions(request: Request) -> Response:
    raw = await request.read() or b""
    try:
        body = orjson.loads(raw)
        base = UPSTREAMS[body["model"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _error(400, "unknown model or bad JSON")
    assert session is not None
    upstream = await session.post(f"{base}/chat/completions", data=raw, headers=UPSTREAM_HEADERS)
    if not body.get("stream"):
        try:
            data = await upstream.read()
        finally:
            upstream.release()
        return Response(upstream.status, None, Content(JSON, data))

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()

    return Response(upstream.status, None, StreamedContent(b"text/event-stream", relay))


async def healthz(request: Request) -> Response:
    return Response(200, None, Content(JSON, b'{"ok":true}'))


def build_app() -> Application:
    """Granian's factory target: one app per worker, with its own router."""
    router = Router()
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_get("/healthz", healthz)
    app = Application(router=router)
    app.on_start += open_session
    app.on_stop += close_session
    return app


def main() -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--backlog", type=int, default=1024, help="Granian's default")
    args = parser.parse_args()
    Granian("bare_proxy:build_app", address=args.host, port=args.port, factory=True,
            interface=Interfaces.ASGI, loop=Loops.uvloop, workers=args.workers,
            backlog=args.backlog, log_level=LogLevels.warning).serve()


if __name__ == "__main__":
    main()
