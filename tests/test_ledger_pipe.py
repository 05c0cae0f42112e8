"""The workers' direct write into the usage queue's pipe (`ledger._DirectPipe`): what it writes
`Queue.get` reads as if `Queue.put` had put it, and whatever it cannot write at once (a frame
over PIPE_BUF, a full pipe, a busy write lock) comes back to the caller, never half-written
and never lost."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

from llm_gateway.ledger import QueueSink, Spool, _DirectPipe


def _queue() -> Any:
    return mp.get_context("fork").Queue()


def test_batches_arrive_whole_without_a_feeder_thread() -> None:
    q = _queue()
    pipe = _DirectPipe(q)
    assert pipe.send([{"n": 1}, {"n": 2}]) == []
    assert pipe.send([{"n": 3}]) == []
    assert q.qsize() == 2
    assert q.get(timeout=5) == [{"n": 1}, {"n": 2}]
    assert q.get(timeout=5) == [{"n": 3}]
    assert q._thread is None  # nothing went through Queue.put
    q.close()


def test_large_batches_split_and_a_record_over_pipe_buf_is_returned() -> None:
    q = _queue()
    big = {"n": "big", "pad": "z" * 5000}
    records = [{"n": 1, "pad": "x" * 3000}, {"n": 2, "pad": "y" * 3000}, big]
    assert _DirectPipe(q).send(records) == [big]
    assert [q.get(timeout=5), q.get(timeout=5)] == [records[:1], records[1:2]]
    q.close()


def test_a_full_pipe_returns_the_rest_and_keeps_the_count_right() -> None:
    q = _queue()
    pipe = _DirectPipe(q)
    sent = 0
    while not pipe.send([{"n": sent, "pad": "p" * 1000}]):
        sent += 1
        assert sent < 10_000
    assert q.qsize() == sent  # the refused frame released its slot
    assert [q.get(timeout=5)[0]["n"] for _ in range(sent)] == list(range(sent))
    assert q.empty()
    q.close()


def test_a_busy_write_lock_returns_the_records() -> None:
    q = _queue()
    q._wlock.acquire()
    try:
        assert _DirectPipe(q).send([{"n": 1}]) == [{"n": 1}]
        assert q.qsize() == 0
    finally:
        q._wlock.release()
    q.close()


def test_a_forked_worker_writes_through_its_own_descriptor() -> None:
    q = _queue()
    pipe = _DirectPipe(q)
    assert pipe.send([{"from": "parent"}]) == []

    def child() -> None:
        os._exit(0 if pipe.send([{"from": "child"}]) == [] else 1)

    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(10)
    assert p.exitcode == 0
    assert {q.get(timeout=5)[0]["from"], q.get(timeout=5)[0]["from"]} == {"parent", "child"}
    q.close()


def test_after_a_put_the_feeder_thread_keeps_the_order() -> None:
    q = _queue()
    q.put(["first"])
    assert _DirectPipe(q).send([{"n": 2}]) == [{"n": 2}]  # it goes through put, after "first"
    q.close()


def test_the_sink_sends_what_the_pipe_refuses_through_put(tmp_path: Path) -> None:
    q = _queue()
    sink = QueueSink(q, Spool(tmp_path), max_depth=100)
    # Three records of which no two fit one frame (distinct strings: pickle shares equal
    # objects), and one that no frame can hold.
    records: list[Any] = [{"request_id": f"r{i}", "pad": "q" * (3000 + i)} for i in range(3)]
    records.append({"request_id": "huge", "pad": "h" * 10_000})

    async def emit_all() -> None:
        for r in records:
            sink.emit(r)  # type: ignore[arg-type]
        sink.flush()

    asyncio.run(emit_all())
    got = [r for _ in range(4) for r in q.get(timeout=5)]
    assert sorted(r["request_id"] for r in got) == ["huge", "r0", "r1", "r2"]
    q.close()
