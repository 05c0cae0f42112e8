"""A first end-to-end benchmark: the gateway vs the fake upstream called directly, same run.

Starts the fake upstream and a gateway (embedded store, GATEWAY_WORKERS workers), creates a
tenant and a route, then drives both with an aiohttp load generator: non-streaming and
streaming chat completions at a fixed concurrency. Prints requests/s, p50 and p99 for each, and
the gateway's added latency over the direct call.

    python perf/bench_gateway.py [--requests 3000] [--concurrency 32] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.conftest import fake_upstream_process, gateway_process


async def drive(url: str, headers: dict[str, str], body: bytes, n: int,
                concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    todo = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t)

        for _ in range(min(100, n)):
            await one()
        latencies.clear()

        async def worker() -> None:
            for _ in todo:
                await one()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"rps": n / wall, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[int(len(latencies) * 0.99)] * 1000, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, float]]] = []
    with fake_upstream_process(chunks=20) as fake, tempfile.TemporaryDirectory() as tmp, \
            gateway_process(Path(tmp), GATEWAY_WORKERS=str(args.workers)) as gw:
        gw.put_model("bench", {"provider": "openai", "base_url": fake.openai_base,
                               "model": "bench"})
        key = gw.create_tenant("bench")["api_key"]
        auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        for stream in (False, True):
            body = orjson.dumps({"model": "bench", "stream": stream,
                                 "messages": [{"role": "user", "content": "hello " * 20}]})
            kind = "stream" if stream else "non-stream"
            for c in (1, args.concurrency):
                n = args.requests if c > 1 else max(300, args.requests // 10)
                direct = uvloop.run(drive(f"{fake.openai_base}/chat/completions", auth, body,
                                          n, c))
                via = uvloop.run(drive(f"{gw.base_url}/chat/completions", auth, body, n, c))
                rows.append((f"{kind} c={c} direct", direct))
                rows.append((f"{kind} c={c} gateway", via))
    print(f"{'scenario':28} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    for name, r in rows:
        print(f"{name:28} {r['rps']:8.0f} {r['p50']:7.2f} {r['p99']:7.2f} {r['errors']:6.0f}")
    for i in range(0, len(rows), 2):
        d, g = rows[i][1], rows[i + 1][1]
        print(f"added by gateway, {rows[i][0].removesuffix(' direct')}: "
              f"p50 {g['p50'] - d['p50']:+.2f} ms, p99 {g['p99'] - d['p99']:+.2f} ms, "
              f"throughput ratio {g['rps'] / d['rps']:.2f}")


if __name__ == "__main__":
    main()
