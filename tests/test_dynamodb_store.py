"""The DynamoDB store against moto's standalone server, through aioboto3 as against AWS: the
same contract as the embedded store (409s, 404s, idempotent usage, paginated usage queries)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from llm_gateway.auth import make_key
from llm_gateway.domain import ResponseOwner, Route, Target, Tenant
from llm_gateway.errors import Conflict, NotFound, ServiceUnavailable
from llm_gateway.settings import Settings
from llm_gateway.store.dynamodb import DynamoDBStore
from llm_gateway.store.embedded import EmbeddedStore

from tests.conftest import Moto, dynamodb_env, unique
from tests.procs import free_port


def settings_for(moto: Moto, table: str, **changes: object) -> Settings:
    return replace(Settings(dynamodb_table_name=table, dynamodb_endpoint_url=moto.url,
                            aws_region="us-east-1", admin_api_key="x"), **changes)  # type: ignore[arg-type]


@pytest.fixture
async def store(moto: Moto) -> AsyncIterator[DynamoDBStore]:
    s = DynamoDBStore(settings_for(moto, unique("T")))
    await s.start()
    yield s
    await s.aclose()


def tenant(tid: str, **kw: object) -> Tenant:
    return Tenant(tenant_id=tid, rpm_limit=10, tpm_limit=1000, created_at=time.time(), **kw)  # type: ignore[arg-type]


def record(tenant_id: str, i: int, t0: float, model: str = "m") -> dict[str, object]:
    return {"request_id": f"req_{i:04d}", "tenant_id": tenant_id, "key_id": "k", "model": model,
            "provider": "openai", "target": "t", "input_tokens": 10, "output_tokens": i,
            "cost": 0.5, "status": 200, "latency_ms": 1.0, "ttft_ms": None, "stream": False,
            "started_at": t0 + i}


async def test_tables_are_created_idempotently(moto: Moto) -> None:
    settings = settings_for(moto, unique("Init"))
    for _ in range(2):  # the second start finds both tables and changes nothing
        s = DynamoDBStore(settings)
        await s.start()
        await s.ping()
        await s.aclose()
    assert s.tables.usage == settings.dynamodb_table_name + "_Usage"
    named = DynamoDBStore(replace(settings, dynamodb_usage_table_name="MyLedger"))
    assert named.tables.usage == "MyLedger"


async def test_missing_table_without_creation_is_503(moto: Moto) -> None:
    s = DynamoDBStore(settings_for(moto, unique("Missing"), create_tables=False))
    await s.start()
    with pytest.raises(ServiceUnavailable, match="init-dynamodb"):
        await s.ping()
    await s.aclose()


async def test_unreachable_is_503() -> None:
    s = DynamoDBStore(Settings(dynamodb_table_name="T", aws_region="us-east-1",
                               dynamodb_endpoint_url=f"http://127.0.0.1:{free_port()}",
                               create_tables=False))
    await s.start()
    with pytest.raises(ServiceUnavailable):
        await s.get_tenant("x")
    await s.aclose()


async def test_tenants_and_keys(store: DynamoDBStore) -> None:
    key = make_key("acme", "sk-acme-secret-1")
    await store.create_tenant(tenant("acme"), key)
    with pytest.raises(Conflict) as exc:
        await store.create_tenant(tenant("acme"), make_key("acme", "sk-other-key-1"))
    assert exc.value.code == "tenant_exists"
    with pytest.raises(Conflict) as exc:
        await store.create_tenant(tenant("acme2"), make_key("acme2", "sk-acme-secret-1"))
    assert exc.value.code == "api_key_exists"
    assert await store.get_tenant("acme2") is None

    found = await store.find_key(key.key_hash)
    assert found is not None and found[0] == key and found[1].tenant_id == "acme"
    second = make_key("acme", "sk-acme-secret-2")
    await store.add_key(second)
    with pytest.raises(NotFound):
        await store.add_key(make_key("ghost", "sk-ghost-key-1"))
    assert {k.key_id for k in await store.list_keys("acme")} == {key.key_id, second.key_id}
    assert await store.delete_key("acme", second.key_id)
    assert not await store.delete_key("acme", second.key_id)
    assert await store.find_key(second.key_hash) is None

    updated = await store.update_tenant("acme", {"rpm_limit": 99, "enabled": False})
    assert updated.rpm_limit == 99 and not updated.enabled
    assert (await store.get_tenant("acme")) == updated
    with pytest.raises(NotFound):
        await store.update_tenant("nobody", {"rpm_limit": 1})
    assert [t.tenant_id for t in await store.list_tenants()] == ["acme"]

    assert await store.delete_tenant("acme")
    assert not await store.delete_tenant("acme")
    assert await store.find_key(key.key_hash) is None
    assert await store.list_keys("acme") == []


async def test_concurrent_updates_lose_nothing(store: DynamoDBStore) -> None:
    await store.create_tenant(tenant("race", allowed_models=()), make_key("race", "sk-race-0001"))
    # Two admins change different fields at once: both changes survive (compare-and-swap).
    await asyncio.gather(store.update_tenant("race", {"rpm_limit": 7}),
                         store.update_tenant("race", {"tpm_limit": 7000}),
                         store.update_tenant("race", {"allowed_models": ["a"]}))
    t = await store.get_tenant("race")
    assert t is not None and (t.rpm_limit, t.tpm_limit, t.allowed_models) == (7, 7000, ("a",))


async def test_routes(store: DynamoDBStore) -> None:
    route = Route("gpt", (Target("openai", "http://u/v1", "gpt-4o", api_key_env="K"),), 1.0, 2.0,
                  updated_at=1.0)
    assert await store.put_route(route)
    assert not await store.put_route(replace(route, input_price_per_mtok=3.0))
    assert (await store.get_route("gpt")) == replace(route, input_price_per_mtok=3.0)
    assert [r.name for r in await store.list_routes()] == ["gpt"]
    assert await store.delete_route("gpt")
    assert not await store.delete_route("gpt")
    assert await store.get_route("gpt") is None


async def test_generation_moves_within_the_ttl(moto: Moto) -> None:
    s = DynamoDBStore(settings_for(moto, "unused", cache_ttl_s=0.0))
    assert s.generation() != s.generation()  # TTL 0: never cached
    s = DynamoDBStore(settings_for(moto, "unused", cache_ttl_s=3600.0))
    g = s.generation()
    assert s.generation() == g
    s._local_writes += 1  # this worker's own admin write is visible at once
    assert s.generation() != g


async def test_usage_is_idempotent_and_paginated(store: DynamoDBStore) -> None:
    t0 = 1_800_000_000.0
    records = [record("u", i, t0, model="a" if i % 2 else "b") for i in range(60)]
    await store.write_usage(records)
    await store.write_usage(records[:30] + records[:30])  # a replay, duplicates in one call
    await store.write_usage([record("other", 1, t0)])

    page = await store.query_usage("u", None, None, None, 25, None)
    assert page.totals == {"requests": 60, "input_tokens": 600,
                           "output_tokens": sum(range(60)), "cost": 30.0}
    seen = [r["request_id"] for r in page.records]
    while page.next_cursor:
        page = await store.query_usage("u", None, None, None, 25, page.next_cursor)
        seen += [r["request_id"] for r in page.records]
    assert seen == [f"req_{i:04d}" for i in range(60)]

    # [from, to): the record at exactly `to` is outside
    window = await store.query_usage("u", t0 + 10, t0 + 20, None, 100, None)
    assert [r["request_id"] for r in window.records] == [f"req_{i:04d}" for i in range(10, 20)]
    only_a = await store.query_usage("u", None, None, "a", 100, None)
    assert only_a.totals["requests"] == 30
    assert all(r["model"] == "a" for r in only_a.records)


def test_init_dynamodb_command_is_idempotent(moto: Moto) -> None:
    env = {**os.environ, **dynamodb_env(moto, unique("Cli")), "ADMIN_API_KEY": "x"}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "llm_gateway", "init-dynamodb"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "_Usage" in out.stdout


async def test_response_owners(store: DynamoDBStore, tmp_path: Path) -> None:
    embedded = EmbeddedStore(tmp_path)
    await embedded.start()
    try:
        for s in (store, embedded):
            # Not an admin write: the caches' generation stays (DynamoDB's also moves with time).
            generation = s.generation() if s is embedded else store._local_writes
            now = time.time()
            live = ResponseOwner("resp_a", "t1", "route", "openai:http://x/v1#m", now + 60)
            await s.put_response_owner(live)
            await s.put_response_owner(ResponseOwner("resp_old", "t1", "r", "t", now - 1))
            assert await s.get_response_owner("resp_a") == ResponseOwner(
                "resp_a", "t1", "route", "openai:http://x/v1#m", float(int(now + 60))
                if s is store else now + 60)
            assert await s.get_response_owner("resp_old") is None  # expired
            assert await s.get_response_owner("resp_none") is None
            await s.delete_response_owner("resp_a")
            assert await s.get_response_owner("resp_a") is None
            assert (s.generation() if s is embedded else store._local_writes) == generation
    finally:
        await embedded.aclose()
