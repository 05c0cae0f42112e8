"""The limiters themselves: exact admission across processes (embedded and Redis), refill,
settlement, never-fits, NOSCRIPT recovery, Redis down, and the OpenAI header format."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest
from llm_gateway.limits import LimiterUnavailable, rate_limit_headers
from llm_gateway.limits.base import Decision, duration
from llm_gateway.limits.embedded import EmbeddedLimiter
from llm_gateway.limits.redis import RedisLimiter

from tests.conftest import RedisServer, redis_process


def _make(kind: str, where: str) -> Any:
    return EmbeddedLimiter(Path(where)) if kind == "embedded" else RedisLimiter(where)


async def _burst(kind: str, where: str, tenant: str, rpm: int, tpm: int, cost: int,
                 n: int) -> int:
    limiter = _make(kind, where)
    await limiter.start()
    try:
        results = await asyncio.gather(*(limiter.reserve(tenant, rpm, tpm, cost)
                                         for _ in range(n)))
    finally:
        await limiter.aclose()
    return sum(d.allowed for d in results)


def _child(kind: str, where: str, tenant: str, rpm: int, tpm: int, cost: int, n: int,
           start: Any, out: Any) -> None:
    start.wait()
    out.put(asyncio.run(_burst(kind, where, tenant, rpm, tpm, cost, n)))


def _admitted_across_processes(kind: str, where: str, tenant: str, rpm: int, tpm: int,
                               cost: int, per_process: int, processes: int = 2) -> int:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(kind, where, tenant, rpm, tpm, cost, per_process,
                                              start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    start.set()
    total = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    return total


@pytest.fixture
def embedded_dir(tmp_path: Path) -> str:
    EmbeddedLimiter.reset(tmp_path)
    return str(tmp_path)


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "embedded":
        EmbeddedLimiter.reset(tmp_path)
        return "embedded", str(tmp_path)
    server: RedisServer = request.getfixturevalue("redis")
    return "redis", server.addr


def test_rpm_exact_across_processes(backend: tuple[str, str]) -> None:
    kind, where = backend
    n = 20
    admitted = _admitted_across_processes(kind, where, f"rpm-{time.time_ns()}", n, 0, 0,
                                          per_process=3 * n // 2 + 1)
    assert admitted == n


def test_tpm_exact_across_processes(backend: tuple[str, str]) -> None:
    kind, where = backend
    # 10,000 tokens per minute, 700 per request: exactly 14 fit.
    admitted = _admitted_across_processes(kind, where, f"tpm-{time.time_ns()}", 0, 10_000,
                                          700, per_process=21)
    assert admitted == 14


async def test_refill_after_computed_wait(backend: tuple[str, str]) -> None:
    kind, where = backend
    limiter = _make(kind, where)
    await limiter.start()
    tenant = f"refill-{time.time_ns()}"
    try:
        for _ in range(120):
            assert (await limiter.reserve(tenant, 120, 0, 0)).allowed
        denied = await limiter.reserve(tenant, 120, 0, 0)
        assert not denied.allowed and denied.denied_by == "rpm"
        assert 0 < denied.retry_after_s <= 0.5  # 120/min refills one every 0.5 s
        assert rate_limit_headers(denied)["retry-after"] == "1"
        await asyncio.sleep(denied.retry_after_s + 0.02)  # the computed wait under test
        assert (await limiter.reserve(tenant, 120, 0, 0)).allowed
    finally:
        await limiter.aclose()


async def test_settle_gives_back_and_takes(backend: tuple[str, str]) -> None:
    kind, where = backend
    limiter = _make(kind, where)
    await limiter.start()
    tenant = f"settle-{time.time_ns()}"
    try:
        d = await limiter.reserve(tenant, 0, 600_000, 5_000)
        assert d.allowed and 594_990 <= d.tpm_remaining <= 595_000
        await limiter.settle(tenant, 600_000, 5_000, 1_000)  # 4,000 unused come back
        after = await limiter.reserve(tenant, 0, 600_000, 0)
        assert 598_990 <= after.tpm_remaining <= 599_100
        await limiter.settle(tenant, 600_000, 0, 9_000)  # used more than reserved
        later = await limiter.reserve(tenant, 0, 600_000, 0)
        assert 589_990 <= later.tpm_remaining <= 590_200
    finally:
        await limiter.aclose()


async def test_never_fits(backend: tuple[str, str]) -> None:
    kind, where = backend
    limiter = _make(kind, where)
    await limiter.start()
    try:
        d = await limiter.reserve(f"big-{time.time_ns()}", 10, 1000, 1001)
        assert not d.allowed and d.never_fits and d.denied_by == "tpm"
        assert d.tpm_remaining == 1000  # nothing was taken
        assert "retry-after" not in rate_limit_headers(d)
    finally:
        await limiter.aclose()


async def test_noscript_recovery(redis: RedisServer) -> None:
    limiter = RedisLimiter(redis.addr)
    await limiter.start()
    try:
        assert (await limiter.reserve("ns", 5, 0, 0)).allowed
        assert redis.cli("SCRIPT", "FLUSH") == "OK"
        assert redis.cli("SCRIPT", "EXISTS", "0" * 40) == "0"
        d = await limiter.reserve("ns", 5, 0, 0)
        assert d.allowed and d.rpm_remaining == 3
    finally:
        await limiter.aclose()


async def test_redis_down_is_unavailable_quickly() -> None:
    with redis_process() as server:
        limiter = RedisLimiter(server.addr)
        await limiter.start()
        assert (await limiter.reserve("x", 5, 0, 0)).allowed
    t = time.monotonic()
    with pytest.raises(LimiterUnavailable):
        await limiter.reserve("x", 5, 0, 0)
    assert time.monotonic() - t < 1.5
    await limiter.aclose()


def test_header_format() -> None:
    d = Decision(allowed=True, denied_by=None, never_fits=False, retry_after_s=0, rpm_limit=60,
                 rpm_remaining=59, rpm_reset_s=1.0, tpm_limit=150_000, tpm_remaining=149_000,
                 tpm_reset_s=0.4)
    assert rate_limit_headers(d) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "400ms"}
    assert duration(360) == "6m0s" and duration(61.2) == "1m2s" and duration(0.12) == "120ms"
