"""The usage ledger loses nothing: a 2-worker gateway on DynamoDB (moto on loopback, through
aioboto3 as against AWS) under a load of concurrent streaming and non-streaming requests, while
the gateway is stopped, its writer killed, DynamoDB taken away for 10 s, or everything killed.
Each test compares the ledger's request ids with the ids of the requests that completed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from llm_gateway.ledger import SPOOL_DIR
from llm_gateway.settings import Settings
from llm_gateway.store.dynamodb import DynamoDBStore

from tests.conftest import (
    FakeUpstream,
    Gateway,
    Moto,
    dynamodb_env,
    fake_upstream_process,
    gateway_env,
    unique,
)
from tests.procs import free_port, running
from tests.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[FakeUpstream]:
    """Streams take ~0.3 s, so a stop or a kill always finds some in flight."""
    with fake_upstream_process(latency_ms=10, chunk_interval_ms=40) as fake:
        yield fake


@contextmanager
def gateway_on(data_dir: Path, moto: Moto, table: str, endpoint: str | None = None,
               **env: str) -> Iterator[tuple[Gateway, subprocess.Popen[bytes]]]:
    port = free_port()
    full_env = gateway_env(data_dir, port, **dynamodb_env(moto, table), **env)
    if endpoint:
        full_env["DYNAMODB_ENDPOINT_URL"] = endpoint
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llm_gateway", "serve"]
    with running(cmd, f"{url}/readyz", env=full_env, deadline_s=30) as proc:
        yield Gateway(url, data_dir, full_env["ADMIN_API_KEY"], full_env), proc


def tenant_with_model(gw: Gateway, upstream: FakeUpstream) -> tuple[str, str, str]:
    model = unique("m")
    gw.put_model(model, {"provider": "openai", "base_url": upstream.openai_base,
                         "model": "fake-gpt-4o"})
    tenant = unique("t")
    return tenant, gw.create_tenant(tenant, allowed_models=[model])["api_key"], model


class Load:
    """`concurrency` clients sending alternately streaming and plain requests until stopped;
    `completed` holds the request id of every response read to its end."""

    def __init__(self, gw: Gateway, key: str, model: str, concurrency: int = 12) -> None:
        self.client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0,
                                         timeout=30)
        self.model = model
        self.completed: list[str] = []
        self.errors = 0
        self._stop = asyncio.Event()
        self._task = asyncio.gather(*(self._user(i) for i in range(concurrency)))

    async def _user(self, i: int) -> None:
        chat = self.client.chat.completions.with_raw_response
        n = 0
        while not self._stop.is_set():
            n += 1
            stream = (i + n) % 2 == 0
            try:
                raw = await chat.create(model=self.model, max_tokens=6, stream=stream,
                                        messages=[{"role": "user", "content": f"hi {i} {n}"}])
                result: Any = raw.parse()
                if stream:
                    async for _ in result:
                        pass
                self.completed.append(raw.headers["x-request-id"])
            except (openai.APIError, openai.APIConnectionError):
                self.errors += 1
                await asyncio.sleep(0.02)  # back off while the gateway is away

    async def until(self, n: int, deadline_s: float = 30) -> None:
        await eventually(lambda: _ready(len(self.completed) >= n), deadline_s,
                         f"{n} completed requests")

    async def stop(self) -> list[str]:
        self._stop.set()
        await self._task
        await self.client.close()
        return self.completed


async def _ready(value: bool) -> bool:
    return value


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)  # poll interval


async def ledger_ids(moto: Moto, table: str, tenant: str) -> list[str]:
    """Every request id in the tenant's ledger, read from DynamoDB directly (all pages)."""
    store = DynamoDBStore(Settings(dynamodb_table_name=table, dynamodb_endpoint_url=moto.url,
                                   create_tables=False))
    await store.start()
    ids: list[str] = []
    cursor = None
    try:
        while True:
            page = await store.query_usage(tenant, None, None, None, 1000, cursor)
            ids += [r["request_id"] for r in page.records]
            cursor = page.next_cursor
            if cursor is None:
                return ids
    finally:
        await store.aclose()


async def ledger_matches(moto: Moto, table: str, tenant: str, completed: list[str]) -> bool:
    return sorted(await ledger_ids(moto, table, tenant)) == sorted(completed)


def report(written: list[str], completed: list[str]) -> None:
    print(f"records written / requests completed: {len(written)} / {len(completed)}")
    assert len(set(written)) == len(written), "duplicate records"
    assert sorted(written) == sorted(completed)


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def writer_pid(parent: int) -> int | None:
    for pid in children(parent):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "usage-writer" and \
                    Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z":
                return pid
        except FileNotFoundError:
            continue
    return None


def kill_tree(parent: int) -> None:
    """SIGKILL the gateway's whole process tree at once (frozen first, so nothing respawns)."""
    pids = [parent, *children(parent)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def spooled_ids(data_dir: Path) -> set[str]:
    ids = set()
    for path in (data_dir / SPOOL_DIR).glob("*"):
        for line in path.read_bytes().splitlines():
            try:
                ids.add(orjson.loads(line)["request_id"])
            except (orjson.JSONDecodeError, KeyError):
                continue  # a torn last line
    return ids


@pytest.mark.parametrize("queue_max", ["100000", "1"], ids=["queue", "full-queue-spills"])
async def test_sigterm_during_load_loses_nothing(moto: Moto, slow_upstream: FakeUpstream,
                                                 tmp_path: Path, queue_max: str) -> None:
    table = unique("Ledger")
    with gateway_on(tmp_path, moto, table, GATEWAY_USAGE_QUEUE_MAX=queue_max) as (gw, proc):
        tenant, key, model = tenant_with_model(gw, slow_upstream)
        load = Load(gw, key, model)
        await load.until(150)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        completed = await load.stop()
    # The gateway has exited: the writer drained everything before it did.
    report(await ledger_ids(moto, table, tenant), completed)


async def test_writer_killed_mid_load_loses_nothing(moto: Moto, slow_upstream: FakeUpstream,
                                                    tmp_path: Path) -> None:
    table = unique("Ledger")
    with gateway_on(tmp_path, moto, table) as (gw, proc):
        tenant, key, model = tenant_with_model(gw, slow_upstream)
        load = Load(gw, key, model)
        await load.until(100)
        first = writer_pid(proc.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: _ready(writer_pid(proc.pid) not in (None, first)), 10,
                         "the writer's restart")
        await load.until(len(load.completed) + 100)
        completed = await load.stop()
        await eventually(lambda: ledger_matches(moto, table, tenant, completed), 30,
                         "the ledger to catch up")
    report(await ledger_ids(moto, table, tenant), completed)


async def test_dynamodb_down_for_10s_loses_nothing(moto: Moto, slow_upstream: FakeUpstream,
                                                   tmp_path: Path) -> None:
    table = unique("Ledger")
    with TcpProxy(("127.0.0.1", moto.port)) as proxy, \
            gateway_on(tmp_path, moto, table, proxy.url, GATEWAY_CACHE_TTL_S="60") as (gw, _):
        tenant, key, model = tenant_with_model(gw, slow_upstream)
        load = Load(gw, key, model)
        await load.until(100)  # both workers have the key and the route cached
        proxy.down()
        before = len(load.completed)
        await asyncio.sleep(10)  # the outage itself, not a wait for something to happen
        served_while_down = len(load.completed) - before
        proxy.up()
        await load.until(len(load.completed) + 100)
        completed = await load.stop()
        await eventually(lambda: ledger_matches(moto, table, tenant, completed), 30,
                         "the spooled records to be replayed")
    print(f"requests served while DynamoDB was down: {served_while_down}")
    assert served_while_down > 0
    report(await ledger_ids(moto, table, tenant), completed)


async def test_whole_gateway_killed_then_restarted(moto: Moto, slow_upstream: FakeUpstream,
                                                   tmp_path: Path) -> None:
    table = unique("Ledger")
    with TcpProxy(("127.0.0.1", moto.port)) as proxy:
        with gateway_on(tmp_path, moto, table, proxy.url, GATEWAY_CACHE_TTL_S="60") as (gw, p):
            tenant, key, model = tenant_with_model(gw, slow_upstream)
            load = Load(gw, key, model)
            await load.until(60)
            # With DynamoDB away, what the writer acknowledged is only in its spool.
            proxy.down()
            await load.until(len(load.completed) + 150)
            completed = await load.stop()
            written = set(await ledger_ids(moto, table, tenant))

            async def all_acknowledged() -> bool:
                return set(completed) <= written | spooled_ids(tmp_path)

            await eventually(all_acknowledged, 15, "the writer to spool every record")
            only_spooled = set(completed) - written
            kill_tree(p.pid)
            p.wait(5)
        proxy.up()
        with gateway_on(tmp_path, moto, table, proxy.url):
            await eventually(lambda: ledger_matches(moto, table, tenant, completed), 30,
                             "the spool to be replayed after the restart")
    print(f"records only in the spool at the kill: {len(only_spooled)}")
    assert only_spooled
    report(await ledger_ids(moto, table, tenant), completed)


async def test_two_instances_share_one_table(moto: Moto, upstream: FakeUpstream,
                                             tmp_path: Path) -> None:
    table = unique("Shared")
    ttl = 1.0
    with gateway_on(tmp_path / "a", moto, table, GATEWAY_CACHE_TTL_S=str(ttl)) as (a, _), \
            gateway_on(tmp_path / "b", moto, table, GATEWAY_CACHE_TTL_S=str(ttl)) as (b, _):
        tenant, key, model = tenant_with_model(a, upstream)
        client = openai.AsyncOpenAI(base_url=b.base_url, api_key=key, max_retries=0)

        async def works_on_b() -> bool:
            try:
                await client.chat.completions.create(
                    model=model, max_tokens=1, messages=[{"role": "user", "content": "x"}])
            except openai.APIStatusError:
                return False
            return True

        t0 = time.monotonic()
        await eventually(works_on_b, ttl + 2, "the tenant created on A to work on B")
        seen_after = time.monotonic() - t0
        with a.admin() as admin:
            r = admin.patch(f"/admin/tenants/{tenant}", json={"enabled": False})
            assert r.status_code == 200
        t0 = time.monotonic()

        async def refused_on_b() -> bool:
            return not await works_on_b()

        await eventually(refused_on_b, ttl + 2, "the tenant disabled on A to be refused on B")
        refused_after = time.monotonic() - t0
        await client.close()
    print(f"created on A, works on B after {seen_after:.2f} s; disabled on A, refused on B "
          f"after {refused_after:.2f} s (cache TTL {ttl} s)")
