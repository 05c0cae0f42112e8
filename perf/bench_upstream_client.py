"""Which upstream client the gateway uses, decided by measurement (recorded in perf/RESULTS.md).

Compares, against the project's fake upstream in the same run, with the same concurrency:
  - httpx on its default httpcore pool,
  - httpx over a minimal aiohttp-backed transport (httpx's API, aiohttp's pool),
  - aiohttp called directly (what `llm_gateway.upstream` does).

    python perf/bench_upstream_client.py [--requests 3000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import orjson
import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.conftest import fake_upstream_process

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 40}],
                     "max_tokens": 8})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's request/response objects carried over an aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content if request.content else await request.aread()
        async with self._session.request(request.method, str(request.url), data=body,
                                         headers=dict(request.headers)) as resp:
            content = await resp.read()
            return httpx.Response(resp.status, headers=list(resp.headers.items()),
                                  content=content)


async def measure(name: str, call: Callable[[], Awaitable[None]], n: int,
                  concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    for _ in range(50):  # warm the pools
        await call()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    latencies.sort()
    return {"client": name, "rps": n / wall, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "cpu_us_per_req": cpu / n * 1e6}


async def main(url: str, n: int, concurrency: int) -> list[dict[str, float]]:
    target = f"{url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    results = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def with_aiohttp() -> None:
            async with session.post(target, data=BODY, headers=headers) as r:
                await r.read()

        results.append(await measure("aiohttp", with_aiohttp, n, concurrency))

        async with httpx.AsyncClient(transport=AiohttpTransport(session)) as hx:
            async def with_httpx_over_aiohttp() -> None:
                (await hx.post(target, content=BODY, headers=headers)).read()

            results.append(await measure("httpx+aiohttp-transport", with_httpx_over_aiohttp, n,
                                         concurrency))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as hx:
        async def with_httpx() -> None:
            (await hx.post(target, content=BODY, headers=headers)).read()

        results.append(await measure("httpx (httpcore pool)", with_httpx, n, concurrency))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with fake_upstream_process() as fake:
        rows = uvloop.run(main(fake.url, args.requests, args.concurrency))
    base = rows[0]["rps"]
    print(f"{'client':26} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10}")
    for r in rows:
        print(f"{r['client']:26} {r['rps']:8.0f} {r['rps'] / base:6.2f} {r['p50_ms']:7.2f} "
              f"{r['p99_ms']:7.2f} {r['cpu_us_per_req']:10.0f}")
