"""Limiter cost per check: calls/s, p50/p99 latency and CPU per call for the embedded and Redis
backends, sequential and with 64 concurrent tasks, plus settles. Redis runs twice: over the lean
RESP channel the gateway uses on a standalone Redis, and through coredis alone (the baseline,
and the Redis Cluster path). On both, a settle waits up to 5 ms for its tenant's next reserve
to carry it, so the sequential settle rows show that wait, not a cost.

    .venv/bin/python perf/bench_limiter.py [--calls 20000]

Starts its own redis-server on a free port (never the shared one) and stops it at the end.
Latency is measured around each awaited call, so under concurrency it includes waiting for the
event loop; calls/s is total calls over wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llm_gateway.limits.embedded import EmbeddedLimiter
from llm_gateway.limits.redis import RedisLimiter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.conftest import redis_process

TENANTS = [f"tenant-{i}" for i in range(100)]
BIG = 10**9  # limits that never deny: the bench measures the check, not the refusals


@contextmanager
def redis_server() -> Iterator[str]:
    with redis_process() as server:
        yield server.addr


async def measure(call: Callable[[int], Awaitable[Any]], calls: int, concurrency: int
                  ) -> dict[str, float]:
    latencies: list[int] = []
    per_task = calls // concurrency

    async def worker(offset: int) -> None:
        for i in range(per_task):
            t = time.perf_counter_ns()
            await call(offset + i)
            latencies.append(time.perf_counter_ns() - t)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w * per_task) for w in range(concurrency)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    q = statistics.quantiles(latencies, n=100)
    return {"calls/s": len(latencies) / wall, "p50 us": q[49] / 1000, "p99 us": q[98] / 1000,
            "cpu us": cpu / len(latencies) * 1e6}


async def bench(limiter: Any, name: str, calls: int, settles: bool) -> list[tuple[str, dict]]:
    async def reserve(i: int) -> Any:
        return await limiter.reserve(TENANTS[i % len(TENANTS)], BIG, BIG, 500)

    async def settle(i: int) -> Any:
        return await limiter.settle(TENANTS[i % len(TENANTS)], BIG, 500, 300)

    rows = []
    await measure(reserve, min(calls, 2000), 1)  # warm up: scripts loaded, slots claimed
    for concurrency in (1, 64):
        rows.append((f"{name} reserve x{concurrency}", await measure(reserve, calls, concurrency)))
        if settles:
            rows.append((f"{name} settle  x{concurrency}", await measure(settle, calls,
                                                                         concurrency)))
    return rows


async def main(calls: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        EmbeddedLimiter.reset(Path(tmp))
        async with EmbeddedLimiter(Path(tmp)) as embedded:
            rows += await bench(embedded, "embedded", calls, settles=True)
    with redis_server() as addr:
        async with RedisLimiter(addr) as redis:
            rows += await bench(redis, "redis", calls, settles=True)
        async with RedisLimiter(addr, lean=False) as redis:
            rows += await bench(redis, "redis/coredis", calls, settles=True)
    print(f"{'':28} {'calls/s':>10} {'p50 us':>9} {'p99 us':>9} {'CPU us':>8}")
    for name, r in rows:
        print(f"{name:28} {r['calls/s']:>10,.0f} {r['p50 us']:>9.1f} {r['p99 us']:>9.1f}"
              f" {r['cpu us']:>8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as granian does")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main(args.calls))
    else:
        asyncio.run(main(args.calls))
