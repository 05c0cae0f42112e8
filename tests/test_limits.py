"""The limiters themselves, on both backends: exact admission across processes, refill after the
computed wait, all-or-nothing admission, settlement, never-fits, unlimited limits; for Redis also
NOSCRIPT recovery, key expiry, batched settles and a dead server; the OpenAI header format."""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing as mp
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from llm_gateway.limits import Decision, LimiterUnavailable, rate_limit_headers
from llm_gateway.limits import embedded as embedded_module
from llm_gateway.limits.base import duration
from llm_gateway.limits.embedded import EmbeddedLimiter, TableFull
from llm_gateway.limits.redis import RedisLimiter, bucket_key

from tests.conftest import RedisServer, redis_process
from tests.procs import forked, free_port

FORK = mp.get_context("fork")
# These tests check what the limiter answers, not how fast: a Redis or a child process left
# unscheduled for a moment on a loaded machine must not turn into LimiterUnavailable, as the
# production deadline (0.25 s, tested by itself below) would make it.
PATIENT_S = 10.0


def _make(kind: str, where: str) -> Any:
    if kind == "embedded":
        return EmbeddedLimiter(Path(where))
    return RedisLimiter(where, timeout_s=PATIENT_S)


def _tenant(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "embedded":
        EmbeddedLimiter.reset(tmp_path)
        return "embedded", str(tmp_path)
    server: RedisServer = request.getfixturevalue("redis")
    return "redis", server.addr


# --- exactness across processes ---------------------------------------------------------------

def _burst(limiter: Any, kind: str, where: str, args: tuple[Any, ...], n: int,
           ready: Any) -> int:
    """In a forked child: `n` concurrent reserves once every child is connected; admissions."""
    async def burst() -> int:
        lim = limiter or _make(kind, where)
        if limiter is None:
            await lim.start()
        ready.wait()  # every process is connected before any request is sent
        results = await asyncio.gather(*(lim.reserve(*args) for _ in range(n)))
        await lim.aclose()
        return sum(d.allowed for d in results)

    return asyncio.run(burst())


async def _admitted(kind: str, where: str, args: tuple[Any, ...], total: int,
                    processes: int = 2, start_in_parent: bool = False) -> int:
    """Send `total` concurrent reserves from `processes` forked processes; count admissions."""
    parent = None
    if start_in_parent:  # the limiter is opened before the fork, as a warmed-up parent would
        parent = _make(kind, where)
        await parent.start()
    ready = FORK.Barrier(processes, timeout=30)  # a sibling that died breaks it, not hangs it
    try:
        counts = forked(_burst, [(parent, kind, where, args, total // processes, ready)]
                        * processes)
    finally:
        if parent is not None:
            await parent.aclose()
    return sum(counts)


async def _exactly(n: int, admitted: Awaitable[int]) -> None:
    """`n` fit in the bucket, and one more every 60/n s: a burst over within 60/n s (0.4 s for
    150) admits exactly n. On a machine so loaded that it lasts longer, the refill of that time
    is all it may add."""
    t = time.monotonic()
    got = await admitted
    refilled = math.floor((time.monotonic() - t) * n / 60)
    assert n <= got <= n + refilled, (got, n, refilled)


@pytest.mark.parametrize("start_in_parent", [False, True])
async def test_embedded_rpm_exact_across_forked_workers(tmp_path: Path,
                                                        start_in_parent: bool) -> None:
    EmbeddedLimiter.reset(tmp_path)
    n = 150
    args = (_tenant("rpm"), n, 0, 0)
    await _exactly(n, _admitted("embedded", str(tmp_path), args, 3 * n, processes=3,
                                start_in_parent=start_in_parent))


async def test_rpm_exact_across_processes(backend: tuple[str, str]) -> None:
    n = 150
    await _exactly(n, _admitted(*backend, (_tenant("rpm"), n, 0, 0), 3 * n))


async def test_tpm_exact_across_processes(backend: tuple[str, str]) -> None:
    # 10,500 tokens per minute, 70 per request: exactly 150 fit, and one more every 0.4 s.
    await _exactly(150, _admitted(*backend, (_tenant("tpm"), 0, 10_500, 70), 450))


# --- semantics ------------------------------------------------------------------------------

async def test_refill_after_computed_wait(backend: tuple[str, str]) -> None:
    async with _make(*backend) as limiter:
        tenant = _tenant("refill")
        for _ in range(120):
            assert (await limiter.reserve(tenant, 120, 0, 0)).allowed
        denied = await limiter.reserve(tenant, 120, 0, 0)
        assert not denied.allowed and denied.denied_by == "rpm" and denied.rpm_remaining == 0
        assert 0.4 < denied.retry_after_s <= 0.5  # 120/min refills one every 0.5 s
        assert rate_limit_headers(denied)["retry-after"] == "1"
        await asyncio.sleep(denied.retry_after_s / 2)
        assert not (await limiter.reserve(tenant, 120, 0, 0)).allowed  # too early
        await asyncio.sleep(denied.retry_after_s / 2 + 0.005)  # + clock resolution
        assert (await limiter.reserve(tenant, 120, 0, 0)).allowed


async def test_token_refill_after_computed_wait(backend: tuple[str, str]) -> None:
    async with _make(*backend) as limiter:
        tenant = _tenant("trefill")
        assert (await limiter.reserve(tenant, 0, 60_000, 60_000)).allowed
        denied = await limiter.reserve(tenant, 0, 60_000, 300)  # 1,000 tokens/s: 0.3 s away
        assert denied.denied_by == "tpm" and not denied.never_fits
        assert 0.28 < denied.retry_after_s <= 0.3
        await asyncio.sleep(denied.retry_after_s + 0.005)
        assert (await limiter.reserve(tenant, 0, 60_000, 300)).allowed


async def test_all_or_nothing(backend: tuple[str, str]) -> None:
    async with _make(*backend) as limiter:
        tenant = _tenant("both")
        first = await limiter.reserve(tenant, 10, 1_000, 600)
        assert first.allowed and first.rpm_remaining == 9 and 400 <= first.tpm_remaining <= 401
        by_tpm = await limiter.reserve(tenant, 10, 1_000, 600)
        assert by_tpm.denied_by == "tpm" and by_tpm.rpm_remaining == 9  # no request was taken
        for _ in range(9):
            assert (await limiter.reserve(tenant, 10, 1_000, 0)).allowed
        by_rpm = await limiter.reserve(tenant, 10, 1_000, 100)
        assert by_rpm.denied_by == "rpm" and 400 <= by_rpm.tpm_remaining <= 402  # no tokens taken
        assert 5.9 < by_rpm.rpm_reset_s <= 60.0


async def test_settle_gives_back_caps_and_takes_overshoot(backend: tuple[str, str]) -> None:
    async with _make(*backend) as limiter:
        tenant = _tenant("settle")
        d = await limiter.reserve(tenant, 0, 6_000, 5_000)  # refills 100 tokens/s
        assert d.allowed and 1_000 <= d.tpm_remaining <= 1_005
        await limiter.settle(tenant, 6_000, 5_000, 1_000)  # 4,000 unused come back
        after = await limiter.reserve(tenant, 0, 6_000, 0)
        assert 5_000 <= after.tpm_remaining <= 5_010
        await limiter.settle(tenant, 6_000, 1_000, 0)  # would exceed capacity: capped
        full = await limiter.reserve(tenant, 0, 6_000, 0)
        assert full.tpm_remaining == 6_000 and full.tpm_reset_s == 0
        await limiter.settle(tenant, 6_000, 0, 9_000)  # used 9,000 more than reserved
        owed = await limiter.reserve(tenant, 0, 6_000, 1)
        # 6,000 - 9,000 = -3,000: the next token is 3,001 tokens (30 s) away, full in 90 s.
        assert not owed.allowed and owed.tpm_remaining == 0
        assert 29.9 < owed.retry_after_s <= 30.01 and 89.9 < owed.tpm_reset_s <= 90.0


async def test_never_fits(backend: tuple[str, str]) -> None:
    async with _make(*backend) as limiter:
        d = await limiter.reserve(_tenant("big"), 10, 1_000, 1_001)
        assert not d.allowed and d.never_fits and d.denied_by == "tpm" and d.retry_after_s == 0
        assert d.tpm_remaining == 1_000 and d.rpm_remaining == 10  # nothing was taken
        assert "retry-after" not in rate_limit_headers(d)


async def test_unlimited(backend: tuple[str, str]) -> None:
    async with _make(*backend) as limiter:
        tenant = _tenant("free")
        for _ in range(50):
            d = await limiter.reserve(tenant, 0, 0, 10**9)
            assert d.allowed
        assert rate_limit_headers(d) == {}
        await limiter.settle(tenant, 0, 10**9, 1)
        # Limits set later start from full buckets, not from whatever the unlimited ones held.
        d = await limiter.reserve(tenant, 5, 100, 100)
        assert d.allowed and d.rpm_remaining == 4 and d.tpm_remaining == 0


# --- embedded specifics -----------------------------------------------------------------------

async def test_embedded_table_full_then_reclaims_idle_slots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_module, "SLOTS", 4)
    EmbeddedLimiter.reset(tmp_path)
    async with EmbeddedLimiter(tmp_path) as lim:
        assert all([(await lim.reserve(f"busy-{i}", 1, 0, 0)).allowed for i in range(4)])
        with pytest.raises(TableFull):  # a LimiterUnavailable: the caller's policy applies
            await lim.reserve("newcomer", 1, 0, 0)
    EmbeddedLimiter.reset(tmp_path)
    async with EmbeddedLimiter(tmp_path) as lim:
        brief = [await lim.reserve(f"brief-{i}", 60_000, 0, 0) for i in range(4)]
        await asyncio.sleep(max(d.rpm_reset_s for d in brief))  # until their buckets are full
        assert (await lim.reserve("newcomer", 1, 0, 0)).allowed
        assert (await lim.reserve("brief-1", 60_000, 0, 0)).rpm_remaining == 59_999


# --- redis specifics --------------------------------------------------------------------------

@pytest.mark.parametrize("lean", [True, False], ids=["resp-channel", "coredis"])
async def test_noscript_recovery(redis: RedisServer, lean: bool) -> None:
    async with RedisLimiter(redis.addr, lean=lean) as lim:
        tenant = _tenant("ns")
        assert (await lim.reserve(tenant, 5, 0, 0)).allowed
        assert redis.cli("SCRIPT", "FLUSH") == "OK"
        d = await lim.reserve(tenant, 5, 0, 0)
        assert d.allowed and d.rpm_remaining == 3
        redis.cli("SCRIPT", "FLUSH")
        await lim.settle(tenant, 600, 0, 10)  # the batched (pipeline) path recovers too
        await asyncio.gather(lim.settle(tenant, 600, 0, 10), lim.settle(tenant, 600, 0, 10))


async def test_a_settle_rides_on_the_next_reserve(redis: RedisServer) -> None:
    async with RedisLimiter(redis.addr) as lim:
        tenant = _tenant("ride")
        assert (await lim.reserve(tenant, 0, 60_000, 10_000)).allowed
        assert redis.cli("CONFIG", "RESETSTAT") == "OK"
        settled = asyncio.ensure_future(lim.settle(tenant, 60_000, 10_000, 1_000))
        await asyncio.sleep(0)  # the settle is waiting for company
        d = await lim.reserve(tenant, 0, 60_000, 0)
        await settled
        assert 59_000 <= d.tpm_remaining <= 60_000  # 9,000 came back with this reserve
        assert lim._refund_timer is None  # nothing left to send alone: no timer to wake for
        stats = redis.cli("INFO", "commandstats")
        assert "cmdstat_evalsha:calls=1," in stats  # one script call for both
        t = time.monotonic()
        await lim.settle(tenant, 60_000, 5_000, 0)  # alone: sent by itself, soon
        assert time.monotonic() - t < 0.5
        assert "cmdstat_evalsha:calls=2," in redis.cli("INFO", "commandstats")


async def test_key_expires_when_buckets_would_be_full(redis: RedisServer) -> None:
    async with RedisLimiter(redis.addr) as lim:
        tenant = _tenant("ttl")
        d = await lim.reserve(tenant, 60, 6_000, 3_000)  # tokens full again in 30 s
        ttl_ms = int(redis.cli("PTTL", bucket_key(tenant)))
        assert 30_000 < ttl_ms <= 31_000 and 29.9 < d.tpm_reset_s <= 30
        await lim.settle(tenant, 6_000, 3_000, 6_000)  # owes 3,000 more: full in 60 s
        assert 60_000 < int(redis.cli("PTTL", bucket_key(tenant))) <= 61_000


async def test_concurrent_settles_are_batched_and_exact(redis: RedisServer) -> None:
    async with RedisLimiter(redis.addr) as lim:
        tenant = _tenant("batch")
        t0 = time.monotonic()
        assert (await lim.reserve(tenant, 0, 60_000, 50_000)).allowed
        await asyncio.gather(*(lim.settle(tenant, 60_000, 1_000, 0) for _ in range(40)))
        d = await lim.reserve(tenant, 0, 60_000, 0)
        refill = (time.monotonic() - t0) * 1_000  # 60,000 per minute
        # 40 x 1,000 back, plus the refill of the moments between the calls.
        assert 50_000 <= d.tpm_remaining <= 50_000 + refill + 1


async def test_redis_down_is_unavailable_quickly() -> None:
    with redis_process() as server:
        lim = RedisLimiter(server.addr)
        await lim.start()
        assert (await lim.reserve("x", 5, 0, 0)).allowed
    for call in (lim.reserve("x", 5, 0, 0), lim.settle("x", 100, 10, 1)):
        t = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await call
        assert time.monotonic() - t < 1.0
    await lim.aclose()
    del call, lim
    _collect_unclosed_coredis_streams()


def _collect_unclosed_coredis_streams() -> None:
    """coredis 6.9 never closes some anyio streams (a failed connection attempt's buffers, a
    cluster layout's error stream); collect them now rather than let their ResourceWarning
    land in a later test or at exit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
        gc.collect()


async def test_redis_url_forms(redis: RedisServer) -> None:
    async with RedisLimiter(f"redis://127.0.0.1:{redis.port}/3") as lim:
        tenant = _tenant("db3")
        assert (await lim.reserve(tenant, 5, 0, 0)).allowed
    assert redis.cli("-n", "3", "EXISTS", bucket_key(tenant)) == "1"
    assert redis.cli("EXISTS", bucket_key(tenant)) == "0"


@contextmanager
def redis_cluster(nodes: int = 3) -> Iterator[str]:
    """A private Redis Cluster of `nodes` primaries; yields one node's address."""
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ports = [free_port() for _ in range(nodes)]
            for port in ports:  # an explicit bus port: free ports may be above 55535
                procs.append(subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", tmp, "--cluster-enabled", "yes",
                     "--cluster-config-file", f"nodes-{port}.conf",
                     "--cluster-port", str(free_port())], stdout=subprocess.DEVNULL))
            for port in ports:
                _wait(lambda p=port: _cli(p, "PING") == "PONG")
            subprocess.run(["redis-cli", "--cluster", "create",
                            *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
                           capture_output=True, check=True, timeout=30)
            for port in ports:
                _wait(lambda p=port: "cluster_state:ok" in _cli(p, "CLUSTER", "INFO"))
            yield f"127.0.0.1:{ports[0]}"
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(5)


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=5).stdout.strip()


def _wait(ready: Callable[[], bool], deadline_s: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        assert time.monotonic() < deadline, "redis cluster did not come up"
        time.sleep(0.05)  # poll interval


async def test_redis_cluster_exact_and_recovers_noscript() -> None:
    with redis_cluster() as addr:
        async with RedisLimiter(addr, cluster=True) as lim:
            tenants = [_tenant("c") for _ in range(30)]  # spread over all three nodes
            results = await asyncio.gather(*(lim.reserve(tenants[i % 30], 3, 1_000, 100)
                                             for i in range(270)))
            assert sum(d.allowed for d in results) == 90
            port = int(addr.rsplit(":", 1)[1])
            for line in _cli(port, "CLUSTER", "NODES").splitlines():
                _cli(int(line.split()[1].split("@")[0].rsplit(":", 1)[1]), "SCRIPT", "FLUSH")
            await asyncio.gather(*(lim.settle(t, 1_000, 100, 0) for t in tenants))
            d = await lim.reserve(tenants[0], 3, 1_000, 0)
            assert not d.allowed and 800 <= d.tpm_remaining <= 802
        del lim
        _collect_unclosed_coredis_streams()


# --- headers ----------------------------------------------------------------------------------

def test_header_format() -> None:
    d = Decision(allowed=True, denied_by=None, never_fits=False, retry_after_s=0, rpm_limit=60,
                 rpm_remaining=59, rpm_reset_s=1.0, tpm_limit=150_000, tpm_remaining=149_000,
                 tpm_reset_s=0.4)
    assert rate_limit_headers(d) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "400ms"}
    denied = Decision(allowed=False, denied_by="rpm", never_fits=False, retry_after_s=0.0421,
                      rpm_limit=60, rpm_remaining=0, rpm_reset_s=360.0, tpm_limit=0,
                      tpm_remaining=0, tpm_reset_s=0)
    assert rate_limit_headers(denied) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "6m0s", "retry-after": "1", "retry-after-ms": "43"}
    assert duration(360) == "6m0s" and duration(61.2) == "1m2s" and duration(0.12) == "120ms"
    assert duration(0) == "0ms" and duration(3725) == "1h2m5s"
