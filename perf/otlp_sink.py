"""A throwaway OTLP/HTTP collector: accepts POST /v1/traces (and any other POST), discards the
body and answers 200, so tracing can stay on during benchmarks. It counts what it received.

    python perf/otlp_sink.py --port 4318
    GET /health -> {"ok": true, "posts": N, "bytes": N}
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web

COUNTS = web.AppKey("counts", dict)


async def accept(request: web.Request) -> web.Response:
    body = await request.read()
    counts = request.app[COUNTS]
    counts["posts"] += 1
    counts["bytes"] += len(body)
    return web.Response(status=200, body=b"", content_type="application/x-protobuf")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, **request.app[COUNTS]})


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[COUNTS] = {"posts": 0, "bytes": 0}
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", accept)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
