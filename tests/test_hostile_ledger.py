"""The ledger under hostile input (issue 12, item 4): no record is lost when the spool cannot be
written, and a record that can never be written is quarantined instead of blocking the rest.

Two levels: a 2-worker gateway (upstream usage of 1e25, a route price of 1e308, a spool that
turns unwritable), and the real usage-writer process fed through a real multiprocessing queue,
against the embedded store and against moto, where the poison records are made by hand."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web
from llm_gateway.call import Call, Outcome
from llm_gateway.chat_request import CHAT
from llm_gateway.domain import Route, Tenant, Usage
from llm_gateway.ingress import Ask
from llm_gateway.ledger import SPOOL_DIR, QueueSink, Spool, check_record
from llm_gateway.settings import Settings
from llm_gateway.usage import usage_record
from llm_gateway.workers.usage_writer import writer_main

from tests.conftest import FakeUpstream, Gateway, Moto, gateway_process, unique
from tests.hostile_upstream import hostile_upstream, openai_completion
from tests.tcp_proxy import TcpProxy
from tests.test_ledger import ledger_ids

POISON_PROMPT = "poison"


def wait_until(check: Callable[[], bool], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # poll interval


def ledger_records(gw: Gateway, tenant: str) -> list[dict[str, Any]]:
    with gw.admin() as admin:
        r = admin.get(f"/admin/tenants/{tenant}/usage", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return r.json()["data"]  # type: ignore[no-any-return]


def metric(gw: Gateway, name: str) -> float:
    """The value of an unlabelled counter on /metrics (0 when absent)."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _chat(base_url: str, key: str, model: str, contents: list[str]) -> list[str]:
    """One request per content, all at once (so their records share writer batches)."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                                  timeout=30) as client:
        raws = await asyncio.gather(*(
            client.chat.completions.with_raw_response.create(
                model=model, max_tokens=4, messages=[{"role": "user", "content": c}])
            for c in contents))
    return [raw.headers["x-request-id"] for raw in raws]


def chat(gw: Gateway, key: str, model: str, contents: list[str]) -> list[str]:
    return asyncio.run(_chat(gw.base_url, key, model, contents))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_process(tmp_path_factory.mktemp("gw-ledger")) as gateway:
        yield gateway


async def usage_of_prompt(request: web.Request) -> web.Response:
    """Usage of 1e25 prompt tokens for the poison prompt, sane usage for every other one."""
    body = await request.json()
    huge = body["messages"][0]["content"] == POISON_PROMPT
    usage = {"prompt_tokens": 10**25 if huge else 3, "completion_tokens": 2,
             "total_tokens": 10**25 + 2 if huge else 5}
    return web.json_response(openai_completion(usage=usage))


def test_upstream_usage_of_1e25_loses_no_record(gw: Gateway) -> None:
    """Before: the 1e25 record failed the spool write and took its whole batch with it."""
    with hostile_upstream(usage_of_prompt) as up:
        model = unique("huge-usage")
        gw.put_model(model, {"provider": "openai", "base_url": up.openai_base, "model": "m"})
        tenant = unique("t")
        key = gw.create_tenant(tenant, allowed_models=[model])["api_key"]
        sent = chat(gw, key, model, [POISON_PROMPT] + [f"hello {i}" for i in range(20)])
    wait_until(lambda: len(ledger_records(gw, tenant)) >= len(sent), 20,
               "every record in the ledger")
    records = ledger_records(gw, tenant)
    print(f"records written / sent: {len(records)} / {len(sent)}")
    assert sorted(r["request_id"] for r in records) == sorted(sent)
    for r in records:
        assert 0 <= r["input_tokens"] <= 2**53


def test_route_price_of_1e308_blocks_no_record(gw: Gateway, upstream: FakeUpstream) -> None:
    """Before: cost `inf` was spooled as null, refused by the store, and retried forever ahead
    of every later record. Now the price is refused (422, the admin API's validation) or, if
    stored, the record is written with a null cost; either way later records are written."""
    dear, cheap = unique("dear"), unique("cheap")
    target = {"provider": "openai", "base_url": upstream.openai_base, "model": "m"}
    with gw.admin() as admin:
        r = admin.put(f"/admin/models/{dear}", json={"targets": [target],
                                                     "input_price_per_mtok": 1e308})
    priced = r.status_code in (200, 201)
    assert priced or r.status_code == 422, r.text
    gw.put_model(cheap, target)
    tenant = unique("t")
    key = gw.create_tenant(tenant, allowed_models=[dear, cheap])["api_key"]
    sent = chat(gw, key, dear, ["a b"]) if priced else []
    sent += chat(gw, key, cheap, [f"a b {i}" for i in range(5)])
    wait_until(lambda: len(ledger_records(gw, tenant)) >= len(sent), 20,
               "the later records in the ledger")
    records = ledger_records(gw, tenant)
    print(f"records written / sent: {len(records)} / {len(sent)} (price stored: {priced})")
    assert sorted(r["request_id"] for r in records) == sorted(sent)
    for r in records:
        assert r["cost"] is None if r["model"] == dear else math.isfinite(r["cost"])


def test_unwritable_spool_loses_no_record(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The spool directory is replaced by a file (chmod does not stop root): every worker's
    spill and every writer's spool write fails with ENOTDIR. Workers spill every record here
    (queue limit 1). Before: the spill raised into the request path and the writer died with
    its batch."""
    with gateway_process(tmp_path, GATEWAY_USAGE_QUEUE_MAX="1") as g:
        model = unique("m")
        g.put_model(model, {"provider": "openai", "base_url": upstream.openai_base,
                            "model": "m"})
        tenant = unique("t")
        key = g.create_tenant(tenant, allowed_models=[model])["api_key"]
        spool = tmp_path / SPOOL_DIR
        shutil.rmtree(spool)
        spool.write_bytes(b"not a directory")
        sent = chat(g, key, model, [f"hi {i}" for i in range(10)])
        wait_until(lambda: len(ledger_records(g, tenant)) >= len(sent), 20,
                   "the records written straight to the store")
        written = ledger_records(g, tenant)
        print(f"records written / sent with the spool unwritable: {len(written)} / {len(sent)}")
        assert sorted(r["request_id"] for r in written) == sorted(sent)
        assert metric(g, "llm_gateway_usage_spool_errors_total") >= 1
        spool.unlink()
        spool.mkdir()
        sent += chat(g, key, model, [f"again {i}" for i in range(10)])
        wait_until(lambda: len(ledger_records(g, tenant)) >= len(sent), 20,
                   "the records after the spool came back")
        assert sorted(r["request_id"] for r in ledger_records(g, tenant)) == sorted(sent)


# Below the HTTP layer: the real writer process on a real queue.


@dataclass
class Ledger:
    settings: Settings
    read_ids: Callable[[], list[str]]


@pytest.fixture(params=["embedded", "dynamodb"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    if request.param == "embedded":
        settings = Settings(data_dir=tmp_path, port=0)

        def embedded_ids() -> list[str]:
            path = tmp_path / "usage.sqlite3"
            if not path.exists():
                return []
            conn = sqlite3.connect(path)
            try:
                return [r[0] for r in conn.execute("SELECT request_id FROM usage")]
            except sqlite3.OperationalError:  # the writer has not created the table yet
                return []
            finally:
                conn.close()

        return Ledger(settings, embedded_ids)
    moto: Moto = request.getfixturevalue("moto")
    table = unique("Hostile")
    settings = Settings(data_dir=tmp_path, port=0, dynamodb_table_name=table,
                        dynamodb_endpoint_url=moto.url, aws_region="us-east-1")
    return Ledger(settings, lambda: asyncio.run(_all_ids(moto, table)))


async def _all_ids(moto: Moto, table: str) -> list[str]:
    try:
        return await ledger_ids(moto, table, "tenant-a") + await ledger_ids(moto, table, "t-b")
    except Exception:  # the writer has not created the table yet
        return []


def record(n: int, tenant: str = "tenant-a", **fields: Any) -> dict[str, Any]:
    return {"request_id": f"req_{unique('r')}_{n}", "client_request_id": None,
            "tenant_id": tenant, "key_id": "key_x", "model": "gpt-4o-mini", "provider": "openai",
            "target": "openai", "input_tokens": 12, "output_tokens": 4, "cost": 0.0001,
            "status": 200, "latency_ms": 12.5, "ttft_ms": None, "stream": False,
            "started_at": time.time(), **fields}


@contextmanager
def writer(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The real writer in a spawned process (its own fresh prometheus_client, multiprocess
    mode), fed by a real queue; stopped by the sentinel, as the gateway stops it."""
    metrics_dir = settings.data_dir / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=writer_main, args=(settings, q), name="usage-writer")
    proc.start()
    try:
        yield q
        q.put(None)
        proc.join(30)
        assert proc.exitcode == 0, f"the writer exited with {proc.exitcode}"
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)


def counter(settings: Settings, name: str) -> float:
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(settings.data_dir / "metrics"))
    value = registry.get_sample_value(name)
    return value or 0.0


def quarantined(settings: Settings) -> list[dict[str, Any]]:
    found = []
    for path in (settings.data_dir / SPOOL_DIR / "quarantine").glob("*.jsonl"):
        found += [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return found


POISONS: dict[str, dict[str, Any]] = {
    "int-over-64-bits": {"input_tokens": 10**25},  # orjson cannot even spool it
    "tenant-null": {"tenant_id": None},
    "started-at-text": {"started_at": "soon"},
    "tokens-negative": {"output_tokens": -5},
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_writer_quarantines_a_poison_record(ledger: Ledger, poison: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    good = [record(i) for i in range(20)]
    bad = record(99, **POISONS[poison])
    later = [record(100 + i, tenant="t-b") for i in range(10)]
    with writer(ledger.settings, monkeypatch) as q:
        q.put([*good[:10], bad, *good[10:]])  # one batch, as a worker hands them over
        q.put(later)
        sent = good + later
        wait_until(lambda: len(ledger.read_ids()) >= len(sent), 30, "the good records")
        wait_until(lambda: counter(ledger.settings, "llm_gateway_usage_records_rejected_total")
                   >= 1, 10, "the rejected counter")
    ids = ledger.read_ids()
    print(f"{poison}: records written / good records sent: {len(ids)} / {len(sent)}")
    assert sorted(ids) == sorted(r["request_id"] for r in sent)
    assert counter(ledger.settings, "llm_gateway_usage_records_rejected_total") == 1
    kept = quarantined(ledger.settings)
    assert [q["record"]["request_id"] for q in kept] == [bad["request_id"]]
    assert kept[0]["reason"]
    assert not list((ledger.settings.data_dir / SPOOL_DIR).glob("*.jsonl"))


def test_writer_writes_a_record_of_infinite_cost(ledger: Ledger,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A cost of inf is spooled as null: the record is written with a null cost, not retried
    forever ahead of the rest."""
    sent = [record(0, cost=math.inf)] + [record(i) for i in range(1, 11)]
    with writer(ledger.settings, monkeypatch) as q:
        q.put(sent)
        wait_until(lambda: len(ledger.read_ids()) >= len(sent), 30, "every record")
    assert sorted(ledger.read_ids()) == sorted(r["request_id"] for r in sent)
    assert counter(ledger.settings, "llm_gateway_usage_records_rejected_total") == 0


def test_writer_survives_an_unwritable_spool(ledger: Ledger, moto: Moto,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool directory becomes a file while the writer runs: records go straight to the
    store; when the store is down too (DynamoDB behind a refusing proxy) they are held until
    one of the two comes back; the spool error counter rises."""
    settings = ledger.settings
    spool = settings.data_dir / SPOOL_DIR
    with TcpProxy(("127.0.0.1", moto.port)) as proxy:
        if settings.dynamodb_endpoint_url:
            from dataclasses import replace

            settings = replace(settings, dynamodb_endpoint_url=proxy.url)
        with writer(settings, monkeypatch) as q:
            first = [record(i) for i in range(5)]
            q.put(first)
            wait_until(lambda: len(ledger.read_ids()) >= 5, 30, "the first records")
            shutil.rmtree(spool)
            spool.write_bytes(b"not a directory")
            second = [record(10 + i) for i in range(10)]
            q.put(second)
            wait_until(lambda: len(ledger.read_ids()) >= 15, 30,
                       "records written straight to the store")
            assert counter(settings, "llm_gateway_usage_spool_errors_total") >= 1
            third = [record(20 + i) for i in range(10)]
            if settings.dynamodb_endpoint_url:
                proxy.down()  # both the spool and the store are away: held in memory
                q.put(third)
                wait_until(lambda: counter(settings, "llm_gateway_usage_spool_errors_total")
                           >= 2, 30, "the writer to meet the broken spool again")
                proxy.up()
            else:
                q.put(third)
            wait_until(lambda: len(ledger.read_ids()) >= 25, 30, "the held records")
            spool.unlink()
            spool.mkdir()
            fourth = [record(30 + i) for i in range(10)]
            q.put(fourth)
            wait_until(lambda: len(ledger.read_ids()) >= 35, 30, "records after the spool "
                       "came back")
    sent = first + second + third + fourth
    ids = ledger.read_ids()
    print(f"records written / sent with the spool unwritable: {len(ids)} / {len(sent)}")
    assert sorted(ids) == sorted(r["request_id"] for r in sent)


# The edge of the record, and the workers' spill.


def _call(usage: Usage, price: float = 1.0, model: str = "m") -> tuple[Call, Outcome]:
    call = Call(request_id="req_1", client_request_id=None,
                tenant=Tenant("t", rpm_limit=0, tpm_limit=0), key_id="k",
                ask=Ask(model, stream=False, max_output_tokens=None, wants_usage=False, body={},
                        raw=b""),
                route=Route("m", (), input_price_per_mtok=price, output_price_per_mtok=price),
                ingress=CHAT, encoding="cl100k_base")
    return call, Outcome(status=200, usage=usage)


@pytest.mark.parametrize(("usage", "price", "tokens", "cost"), [
    (Usage(10**25, 2), 1.0, (2**53, 2), (2**53 + 2) / 1e6),
    (Usage(-7, 2**80), 1.0, (0, 2**53), 2**53 / 1e6),
    (Usage(float("nan"), float("inf")), 1.0, (0, 2**53), 2**53 / 1e6),  # type: ignore[arg-type]
    (Usage(3, 2), 1e308, (3, 2), None),
    (Usage(0, 0), math.inf, (0, 0), None),  # inf * 0 is nan
])
def test_usage_record_is_always_storable(usage: Usage, price: float, tokens: tuple[int, int],
                                         cost: float | None) -> None:
    r = usage_record(*_call(usage, price, model="bad\ud800name"))
    assert (r["input_tokens"], r["output_tokens"]) == tokens
    assert r["cost"] == (pytest.approx(cost) if cost is not None else None)
    orjson.dumps(r)  # raises if it is not encodable
    check_record(r)  # what both stores require


def test_spill_to_an_unwritable_spool_keeps_the_records(tmp_path: Path) -> None:
    """A worker's spill (queue too deep) meets a spool that is a file: no exception reaches the
    request path, and the records go on the queue after all."""
    spool = Spool(tmp_path)
    shutil.rmtree(spool.dir)
    spool.dir.write_bytes(b"not a directory")
    q = mp.get_context("spawn").Queue()
    q.put(["already queued"])
    wait_until(lambda: q.qsize() == 1, 5, "the queue to hold one item")
    sink = QueueSink(q, spool, max_depth=1)
    records = [record(i) for i in range(3)]

    async def emit_all() -> None:
        for r in records:
            sink.emit(r)
        sink.flush()

    asyncio.run(emit_all())
    assert q.get(timeout=5) == ["already queued"]
    assert q.get(timeout=5) == records
    q.close()


def test_writer_quarantines_what_dynamodb_refuses(moto: Moto, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An item over DynamoDB's 400 KB: a record that passes every check of ours, refused by
    the service (ValidationException), quarantined; the records around it written."""
    table = unique("Hostile")
    settings = Settings(data_dir=tmp_path, port=0, dynamodb_table_name=table,
                        dynamodb_endpoint_url=moto.url, aws_region="us-east-1")
    good = [record(i) for i in range(20)]
    bad = record(99, note="x" * 500_000)
    with writer(settings, monkeypatch) as q:
        q.put([*good[:10], bad, *good[10:]])
        wait_until(lambda: len(asyncio.run(_all_ids(moto, table))) >= 20, 30, "good records")
        wait_until(lambda: counter(settings, "llm_gateway_usage_records_rejected_total") >= 1,
                   10, "the rejected counter")
    assert sorted(asyncio.run(_all_ids(moto, table))) == sorted(r["request_id"] for r in good)
    assert [(q["record"]["request_id"], q["reason"]) for q in quarantined(settings)] == \
        [(bad["request_id"], "ValidationException")]
