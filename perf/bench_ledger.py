"""Usage-ledger throughput, into the DynamoDB-compatible server (moto on loopback) and into the
embedded store.

Two numbers per store:
- `store`: `write_usage` alone, in batches of 500 (BatchWriteItem 25 at a time, 4 in flight).
- `writer`: the whole path: records put on a multiprocessing queue, the real usage-writer
  process (spool + fsync + store), until the ledger holds them all.

    python perf/bench_ledger.py [--records 5000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from llm_gateway.ledger import SPOOL_DIR
from llm_gateway.settings import Settings
from llm_gateway.store import make_store
from llm_gateway.workers.usage_writer import WriterSupervisor

from tests.conftest import moto_process


def records(n: int, tenant: str) -> list[dict[str, Any]]:
    t0 = time.time()
    return [{"request_id": f"req_{tenant}_{i:07d}", "client_request_id": None,
             "tenant_id": tenant, "key_id": "key_x", "model": "gpt-4o-mini",
             "provider": "openai", "target": "openai:http://u/v1#gpt-4o-mini",
             "input_tokens": 120, "output_tokens": 40, "cost": 0.00012, "status": 200,
             "latency_ms": 321.5, "ttft_ms": 80.25, "stream": bool(i % 2),
             "started_at": t0 + i / 1000} for i in range(n)]


async def count(settings: Settings, tenant: str) -> int:
    store = make_store(replace(settings, create_tables=False))
    await store.start()
    try:
        page = await store.query_usage(tenant, None, None, None, 1, None)
        return int(page.totals["requests"])
    finally:
        await store.aclose()


async def bench_store(settings: Settings, n: int) -> float:
    store = make_store(settings)
    await store.start()
    batch = records(n, "store")
    t0 = time.perf_counter()
    for i in range(0, n, 500):
        await store.write_usage(batch[i:i + 500])
    rate = n / (time.perf_counter() - t0)
    await store.aclose()
    assert await count(settings, "store") == n
    return rate


def bench_writer(settings: Settings, n: int) -> float:
    q = mp.get_context("fork").Queue()
    writer = WriterSupervisor(settings, q)
    writer.start()
    t0 = time.perf_counter()
    for r in records(n, "writer"):
        q.put(r)
    # Done when the queue is empty and the spool too (the writer removes a spool file only
    # once the store has it); polling the store itself would compete with the writer.
    spool = settings.data_dir / SPOOL_DIR
    while q.qsize() or not spool.exists() or any(spool.iterdir()):
        time.sleep(0.01)  # poll interval
    rate = n / (time.perf_counter() - t0)
    writer.stop(timeout_s=30)
    assert uvloop.run(count(settings, "writer")) == n
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=5000)
    n = parser.parse_args().records
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    print(f"{n} records per run; records/s")
    with tempfile.TemporaryDirectory() as tmp, moto_process() as moto:
        stores = {
            "embedded": Settings(data_dir=Path(tmp) / "embedded"),
            "dynamodb (moto)": Settings(data_dir=Path(tmp) / "ddb", dynamodb_table_name="Bench",
                                        dynamodb_endpoint_url=moto.url),
        }
        for name, settings in stores.items():
            settings.data_dir.mkdir(parents=True)
            if settings.embedded_store:
                from llm_gateway.store.embedded import EmbeddedStore

                EmbeddedStore.initialize(settings.data_dir)
            store_rate = uvloop.run(bench_store(settings, n))
            writer_rate = bench_writer(settings, n)
            print(f"{name:16} store {store_rate:8.0f}   writer (queue -> spool -> store) "
                  f"{writer_rate:8.0f}")


if __name__ == "__main__":
    main()
