"""The usage writer: one process that drains the usage queue into the ledger.

It ignores SIGINT and SIGTERM (a Ctrl-C or a rolling deploy signals the whole process group):
only the sentinel that the parent puts on the queue after every worker has exited stops it, so
it always drains what the workers produced. The parent restarts it if it dies; records it had
in hands are in the spool and are written by its successor.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from pathlib import Path
from typing import Any

import uvloop
from llm_gateway import observability as obs
from llm_gateway.ledger import Spool
from llm_gateway.settings import Settings

log = logging.getLogger("llm_gateway.usage_writer")
STOP = None  # the sentinel
BATCH = 500
# After a batch that emptied the queue, let records gather for a moment before taking more:
# at low rates this turns one spool file (and fsync, and store call) per record into one per
# batch. They wait on the queue meanwhile, where a killed writer cannot lose them.
PACE_S = 0.05
WRITER_NICE = 5


def writer_main(settings: Settings, q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _name_process("usage-writer")
    # Its batches (spool fsync, store write) must not delay requests on a shared core; records
    # wait safely on the queue, and at this priority it still gets a quarter of a busy core.
    with contextlib.suppress(OSError):
        os.nice(WRITER_NICE)
    from llm_gateway.workers.server import make_store

    obs.configure(settings, tracing=False)
    loop = uvloop.new_event_loop()
    store = make_store(settings)
    started = False
    spool = Spool(settings.data_dir)
    reported_at = 0.0
    parent = os.getppid()
    failures, retry_at, stopping = 0, 0.0, False
    try:
        while True:
            batch, stopping = _take(q, stopping)
            if batch:
                spool.write(batch)
            if time.monotonic() - reported_at >= 1.0:
                reported_at = time.monotonic()
                obs.set_usage_queue_depth(_depth(q))
                obs.set_spooled_records(spool.count())
            if os.getppid() != parent:
                stopping = True  # orphaned: drain what is queued, then go
            if time.monotonic() >= retry_at:
                try:
                    if not started:
                        # Started here, not before the loop: with the store down the writer
                        # keeps spooling what it takes off the queue while it retries.
                        loop.run_until_complete(store.start())
                        started = True
                    for path in spool.pending():
                        loop.run_until_complete(store.write_usage(spool.read(path)))
                        spool.remove(path)
                        failures = 0
                except Exception as exc:
                    failures += 1
                    retry_at = time.monotonic() + min(5.0, 0.1 * 2 ** failures)
                    log.warning("usage ledger unavailable (%s): records stay spooled",
                                type(exc).__name__)
            if stopping and _empty(q):
                if started:
                    _final_flush(loop, store, spool)
                return
            if batch and len(batch) < BATCH and not stopping:
                time.sleep(PACE_S)
    finally:
        if started:
            loop.run_until_complete(store.aclose())
        loop.close()


def _name_process(name: str) -> None:
    """Show the writer as `usage-writer` in ps/top (a fork otherwise looks like the parent)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name)


def _take(q: Any, stopping: bool) -> tuple[list[dict[str, Any]], bool]:
    batch: list[dict[str, Any]] = []
    try:
        item = q.get(timeout=0.2)
    except queue_mod.Empty:
        return batch, stopping
    while True:
        if item is STOP:
            stopping = True
        elif isinstance(item, list):  # a worker's records (QueueSink gathers them)
            batch.extend(item)
        else:
            batch.append(item)
        if len(batch) >= BATCH:
            return batch, stopping
        try:
            item = q.get_nowait()
        except queue_mod.Empty:
            return batch, stopping


def _depth(q: Any) -> int:
    try:
        return int(q.qsize())
    except (OSError, NotImplementedError):
        return 0


def _empty(q: Any) -> bool:
    try:
        return bool(q.empty())
    except OSError:
        return True


def _final_flush(loop: Any, store: Any, spool: Spool, budget_s: float = 10.0) -> None:
    """At shutdown: try to write what is spooled; what cannot be written stays for next start."""
    deadline = time.monotonic() + budget_s
    for path in spool.pending():
        if time.monotonic() > deadline:
            return
        try:
            loop.run_until_complete(store.write_usage(spool.read(path)))
        except Exception:
            return
        spool.remove(path)


def _release_read_lock(q: Any) -> None:
    """A writer killed inside `get()` dies holding the queue's read lock, and its successor
    would never read again. The writer is the queue's only reader, so once it is dead a held
    lock can only be that stale one: free it."""
    lock = q._rlock
    lock.acquire(False)  # takes the free lock, or finds it held by the dead writer
    lock.release()


class WriterSupervisor:
    """Runs the writer in the parent's process tree and restarts it if it dies."""

    def __init__(self, settings: Settings, q: Any) -> None:
        self._settings = settings
        self._q = q
        self._stopping = False
        self._proc: mp.process.BaseProcess | None = None
        self._thread = threading.Thread(target=self._watch, name="usage-writer-supervisor",
                                        daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        self._proc = mp.get_context("fork").Process(
            target=writer_main, args=(self._settings, self._q), name="usage-writer")
        self._proc.start()

    def _watch(self) -> None:
        while not self._stopping:
            assert self._proc is not None
            self._proc.join(0.5)
            if self._proc.exitcode is not None and not self._stopping:
                log.warning("usage writer exited with %s; restarting it", self._proc.exitcode)
                _release_read_lock(self._q)
                self._spawn()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, timeout_s: float) -> None:
        """After every worker has exited: let the writer drain the queue, then stop."""
        self._stopping = True
        self._q.put(STOP)
        assert self._proc is not None
        self._proc.join(timeout_s)
        if self._proc.exitcode is None:
            self._proc.kill()
