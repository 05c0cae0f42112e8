"""The limiter under an unlucky operator's Redis: error replies (OOM, BUSY, READONLY,
MASTERDOWN) follow GATEWAY_LIMITER_FAILURE_MODE like a lost connection, on the lean RESP channel,
through coredis and on a Cluster; /readyz reports the limiter. And the forked-process harness of
the limiter tests: a child's failure is reported with its traceback, and a Redis stall (what a
loaded machine does) no longer fails the exactness tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from llm_gateway.limits import LimiterFault, LimiterUnavailable
from llm_gateway.limits.redis import RedisLimiter, bucket_key

from tests.conftest import FakeUpstream, Gateway, RedisServer, gateway_process, redis_process
from tests.procs import ChildFailed, free_port
from tests.test_limits import _admitted, _cli, _collect_unclosed_coredis_streams, redis_cluster

KINDS = ["OOM", "BUSY", "READONLY", "MASTERDOWN"]
MSG = [{"role": "user", "content": "hi"}]


def _until(ready: Callable[[], bool], what: str, deadline_s: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # poll interval


@contextmanager
def broken(server: RedisServer, kind: str) -> Iterator[None]:
    """Until the block ends, `server` answers the limiter's script with `-<kind> ...`."""
    port = server.port
    with ExitStack() as undo:
        if kind == "OOM":
            _cli(port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
            _cli(port, "CONFIG", "SET", "maxmemory", "1")
            undo.callback(_cli, port, "CONFIG", "SET", "maxmemory", "0")
        elif kind == "BUSY":
            _cli(port, "CONFIG", "SET", "busy-reply-threshold", "10")
            busy = subprocess.Popen(["redis-cli", "-p", str(port), "EVAL", "while true do end",
                                     "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            undo.callback(busy.wait, 10)
            undo.callback(_until, lambda: _cli(port, "SCRIPT", "KILL") == "OK", "SCRIPT KILL")
            _until(lambda: _cli(port, "PING").startswith("BUSY"), "BUSY replies")
        elif kind == "READONLY":
            primary = undo.enter_context(redis_process())
            # A sync through the socket, not an RDB file in the current directory (`dir` is a
            # protected config in Redis 7: it cannot be moved at run time).
            _cli(primary.port, "CONFIG", "SET", "repl-diskless-sync", "yes")
            _cli(primary.port, "CONFIG", "SET", "repl-diskless-sync-delay", "0")
            _cli(port, "CONFIG", "SET", "repl-diskless-load", "swapdb")
            undo.callback(_cli, port, "CONFIG", "SET", "repl-diskless-load", "disabled")
            undo.callback(_cli, port, "REPLICAOF", "NO", "ONE")
            _cli(port, "REPLICAOF", "127.0.0.1", str(primary.port))
            _until(lambda: "master_link_status:up" in _cli(port, "INFO", "replication"),
                   "the replica link")
        elif kind == "MASTERDOWN":
            _cli(port, "CONFIG", "SET", "replica-serve-stale-data", "no")
            undo.callback(_cli, port, "CONFIG", "SET", "replica-serve-stale-data", "yes")
            undo.callback(_cli, port, "REPLICAOF", "NO", "ONE")
            _cli(port, "REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that never answers
            _until(lambda: _cli(port, "PING").startswith("MASTERDOWN"), "MASTERDOWN replies")
        yield


def _tenant(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


# --- item 7: error replies are unavailability, on every Redis path ------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lean", [True, False], ids=["resp-channel", "coredis"])
async def test_error_replies_are_unavailable(kind: str, lean: bool) -> None:
    with redis_process() as server:
        await _error_replies_are_unavailable(server, kind, lean)
    await _settle_coredis()


async def _settle_coredis() -> None:
    """coredis' connection tasks end a few loop turns after the client is closed; then their
    unclosed streams can be collected here, not at the end of the session as a warning."""
    for _ in range(20):
        await asyncio.sleep(0)
    _collect_unclosed_coredis_streams()


async def _error_replies_are_unavailable(server: RedisServer, kind: str, lean: bool) -> None:
    async with RedisLimiter(server.addr, lean=lean) as lim:
        tenant = _tenant("err")
        assert (await lim.reserve(tenant, 5, 100, 1)).allowed
        await lim.ping()
        with broken(server, kind):
            calls = [lim.reserve(tenant, 5, 100, 1), lim.settle(tenant, 100, 10, 1),
                     lim.ping()]
            together = await asyncio.gather(  # coredis sends these as one pipeline
                *(lim.reserve(f"{tenant}-{i}", 5, 100, 1) for i in range(3)),
                return_exceptions=True)
            for call in calls:
                with pytest.raises(LimiterUnavailable) as exc:
                    await call
                assert not isinstance(exc.value, LimiterFault), exc.value
            for result in together:
                assert type(result) is LimiterUnavailable, result
        await lim.ping()  # the same connection recovers by itself
        assert (await lim.reserve(tenant, 5, 100, 1)).allowed


@pytest.mark.parametrize("lean", [True, False], ids=["resp-channel", "coredis"])
async def test_a_reply_no_outage_explains_is_a_fault_under_the_same_policy(
        redis: RedisServer, lean: bool) -> None:
    """A foreign string under a tenant's key: the script's HMGET answers WRONGTYPE."""
    await _wrongtype_is_a_fault(redis, lean)
    await _settle_coredis()


async def _wrongtype_is_a_fault(redis: RedisServer, lean: bool) -> None:
    async with RedisLimiter(redis.addr, lean=lean) as lim:
        tenant = _tenant("wrongtype")
        redis.cli("SET", bucket_key(tenant), "not a hash")
        with pytest.raises(LimiterFault):  # a LimiterUnavailable: the failure mode applies
            await lim.reserve(tenant, 5, 100, 1)
        redis.cli("DEL", bucket_key(tenant))
        assert (await lim.reserve(tenant, 5, 100, 1)).allowed


async def test_cluster_oom_is_unavailable() -> None:
    with redis_cluster() as addr:
        await _cluster_oom_is_unavailable(addr)
        await _settle_coredis()  # with the errors' tracebacks gone, before the nodes stop


async def _cluster_oom_is_unavailable(addr: str) -> None:
    ports = [int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
             for line in _cli(int(addr.rsplit(":", 1)[1]), "CLUSTER", "NODES").splitlines()]
    async with RedisLimiter(addr, cluster=True) as lim:
        tenants = [_tenant("c") for _ in range(12)]  # over all three nodes
        assert all(d.allowed for d in await asyncio.gather(
            *(lim.reserve(t, 5, 100, 1) for t in tenants)))
        for port in ports:
            _cli(port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
            _cli(port, "CONFIG", "SET", "maxmemory", "1")
        results = await asyncio.gather(*(lim.reserve(t, 5, 100, 1) for t in tenants),
                                       return_exceptions=True)
        assert all(type(r) is LimiterUnavailable for r in results), results
        with pytest.raises(LimiterUnavailable):
            await lim.reserve(tenants[0], 5, 100, 1)  # alone: not in a pipeline
        with pytest.raises(LimiterUnavailable):
            await lim.ping()
        for port in ports:
            _cli(port, "CONFIG", "SET", "maxmemory", "0")
        assert (await lim.reserve(tenants[0], 5, 100, 1)).allowed


def _limiter_errors(gw: Gateway) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("llm_gateway_limiter_errors_total "):
            return float(line.split()[1])
    return 0.0


def _ready(gw: Gateway) -> httpx.Response:
    return httpx.get(f"{gw.url}/readyz", timeout=10)


@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("closed", 503)])
def test_gateway_follows_the_failure_mode_on_error_replies_and_readyz_shows_it(
        tmp_path: Path, upstream: FakeUpstream, mode: str, status: int) -> None:
    with redis_process() as server, gateway_process(
            tmp_path, REDIS_ADDR=server.addr, GATEWAY_LIMITER_FAILURE_MODE=mode) as gw:
        model = f"m-{os.urandom(4).hex()}"
        gw.put_model(model, {"provider": "openai", "base_url": upstream.openai_base,
                             "model": "m"})
        key = gw.create_tenant(_tenant("t"), rpm_limit=1000)["api_key"]
        headers = {"Authorization": f"Bearer {key}"}

        def post() -> httpx.Response:
            return httpx.post(f"{gw.base_url}/chat/completions", headers=headers, timeout=10,
                              json={"model": model, "messages": MSG})

        assert post().headers["x-ratelimit-limit-requests"] == "1000"
        assert _ready(gw).json()["limiter"] == "ok"
        errors = _limiter_errors(gw)
        for kind in KINDS:
            with broken(server, kind):
                for _ in range(3):  # both workers, each on its own connection
                    r = post()
                    assert r.status_code == status, (kind, r.text)
                    if status == 503:
                        err = r.json()["error"]
                        assert err["code"] == "rate_limiter_unavailable", (kind, err)
                        assert err["type"] and err["message"]
                    else:
                        assert "x-ratelimit-limit-requests" not in r.headers
                ready = _ready(gw)
                if mode == "open":
                    assert ready.status_code == 200 and ready.json()["limiter"] == "degraded"
                else:
                    assert ready.status_code == 503, (kind, ready.text)
                    assert ready.json()["error"]["code"] == "rate_limiter_unavailable"
            _until(lambda: _ready(gw).status_code == 200
                   and _ready(gw).json()["limiter"] == "ok", f"/readyz after {kind}")
            assert post().headers["x-ratelimit-limit-requests"] == "1000", kind
        assert _limiter_errors(gw) >= errors + 3 * len(KINDS)

        server.stop()  # unreachable
        ready = _ready(gw)
        if mode == "open":
            assert ready.status_code == 200 and ready.json()["limiter"] == "degraded"
            assert post().status_code == 200
        else:
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "rate_limiter_unavailable"


# --- item 8: the forked-process harness ---------------------------------------------------------

async def test_harness_reports_a_failed_child_at_once_with_its_traceback() -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every child fails to connect
    t = time.monotonic()
    with pytest.raises(ChildFailed) as failed:
        await _admitted("redis", dead, (_tenant("dead"), 5, 0, 0), 10)
    assert time.monotonic() - t < 15  # not the 30 s of a queue that never fills
    assert "exit code 1" in str(failed.value)
    assert "LimiterUnavailable" in str(failed.value)  # the child's own traceback


async def test_exactness_survives_a_redis_stall() -> None:
    """A Redis that is not scheduled for 0.6 s, as on a loaded machine, while the children
    connect and send: the counts must still be exact (this stall made the 0.25 s call deadline
    fail a child, seen by the parent as queue.Empty after 30 s)."""
    with redis_process() as server:
        os.kill(server.proc.pid, signal.SIGSTOP)
        resume = threading.Timer(0.6, os.kill, (server.proc.pid, signal.SIGCONT))
        resume.start()  # the stall's length is the condition under test
        try:
            n = 20
            assert await _admitted("redis", server.addr, (_tenant("stall"), n, 0, 0), 3 * n) == n
        finally:
            resume.join()
