"""The usage writer: one process that drains the usage queue into the ledger.

It ignores SIGINT and SIGTERM (a Ctrl-C or a rolling deploy signals the whole process group):
only the sentinel that the parent puts on the queue after every worker has exited stops it, so
it always drains what the workers produced. The parent restarts it if it dies; records it had
in hands are in the spool and are written by its successor.

What it does when a step fails (the ledger loses no record, and no record blocks the rest):
- the spool cannot be written (disk full, directory gone): the batch stays in memory, the spool
  is retried with backoff, and meanwhile the batch goes straight to the store;
- the store is away (`ServiceUnavailable`): records wait in the spool, retried with backoff;
- the store refuses a batch for its content (`RecordRejected`, or any other error): halves of
  it are written in turn until the records at fault are found; each goes to the quarantine
  (`usage-spool/quarantine/`), is counted and logged, and the others are written.
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
from llm_gateway.errors import ServiceUnavailable
from llm_gateway.ledger import RecordRejected, Rejected, Spool
from llm_gateway.settings import Settings
from llm_gateway.store import make_store

log = logging.getLogger("llm_gateway.usage_writer")
STOP = None  # the sentinel
BATCH = 500
# After a batch that emptied the queue, let records gather for a moment before taking more:
# at low rates this turns one spool file (and fsync, and store call) per record into one per
# batch. They wait on the queue meanwhile, where a killed writer cannot lose them.
PACE_S = 0.05
WRITER_NICE = 5
# Records held in memory (spool and store both away) beyond which the writer stops taking
# more: they wait on the queue instead, as safe there as here.
HELD_MAX = 20 * BATCH


def writer_main(settings: Settings, q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _name_process("usage-writer")
    # Its batches (spool fsync, store write) must not delay requests on a shared core; records
    # wait safely on the queue, and at this priority it still gets a quarter of a busy core.
    with contextlib.suppress(OSError):
        os.nice(WRITER_NICE)
    obs.configure(settings, tracing=False)
    UsageWriter(settings, q).run()


class Backoff:
    """When a failing step may be tried again: 0.1 s doubling up to 5 s, reset by a success."""

    def __init__(self) -> None:
        self.failures = 0
        self._at = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._at

    def failed(self) -> None:
        self.failures += 1
        self._at = time.monotonic() + min(5.0, 0.1 * 2 ** self.failures)

    def succeeded(self) -> None:
        self.failures, self._at = 0, 0.0


class UsageWriter:
    """The writer's loop and its state: take a batch, spool it, write the spool to the store."""

    def __init__(self, settings: Settings, q: Any) -> None:
        self._q = q
        self._loop = uvloop.new_event_loop()
        self._store = make_store(settings)
        self._started = False
        self._spool = Spool(settings.data_dir)
        self._parent = os.getppid()
        self._stopping = False
        self._reported_at = 0.0
        self._held: list[Any] = []  # taken off the queue, in no spool file yet
        self._rejected: list[Rejected] = []  # never writable, not yet in quarantine
        self._spool_retry = Backoff()
        self._store_retry = Backoff()

    def run(self) -> None:
        try:
            while True:
                batch = self._take()
                self._hold(batch)
                self._report()
                if os.getppid() != self._parent:
                    self._stopping = True  # orphaned: drain what is queued, then go
                if self._store_retry.due():
                    self._write_store()
                self._quarantine()
                if self._stopping and _empty(self._q):
                    self._final_flush()
                    return
                if batch and len(batch) < BATCH and not self._stopping:
                    time.sleep(PACE_S)
        finally:
            if self._started:
                self._loop.run_until_complete(self._store.aclose())
            self._loop.close()

    def _take(self) -> list[Any]:
        if len(self._held) >= HELD_MAX:
            time.sleep(0.2)  # as long as a get() would wait: the records stay queued
            return []
        batch, self._stopping = _take(self._q, self._stopping)
        return batch

    def _hold(self, batch: list[Any], force: bool = False) -> None:
        """Put what is held in a spool file; if the spool fails, keep it for the store."""
        self._held += batch
        if not self._held or not (force or self._spool_retry.due()):
            return
        try:
            self._rejected += self._spool.write(self._held)
        except Exception as exc:
            self._spool_retry.failed()
            obs.usage_spool_error()
            log.warning("usage spool unwritable (%s): %d records held, written straight to "
                        "the store", type(exc).__name__, len(self._held))
            return
        self._held = []
        self._spool_retry.succeeded()

    def _report(self) -> None:
        if time.monotonic() - self._reported_at >= 1.0:
            self._reported_at = time.monotonic()
            obs.set_usage_queue_depth(_depth(self._q))
            obs.set_spooled_records(self._spool.count() + len(self._held))

    def _write_store(self) -> None:
        """Held records, then every spool file; stop at the first sign the store is away."""
        try:
            if not self._started:
                # Started here, not before the loop: with the store down the writer keeps
                # spooling what it takes off the queue while it retries.
                self._run(self._store.start())
                self._started = True
            if self._held:
                self._rejected += self._run(self._write_all(self._held))
                self._held = []
            for path in self._spool.pending():
                self._write_file(path)
        except Exception as exc:
            self._store_retry.failed()
            log.warning("usage ledger unavailable (%s): records stay spooled",
                        type(exc).__name__)
        else:
            self._store_retry.succeeded()

    def _write_file(self, path: Path) -> None:
        """One spool file; it is removed once every record is in the store or in quarantine
        (under the file's name, so a replay of it overwrites, not adds)."""
        try:
            records = self._spool.read(path)
        except OSError as exc:  # this file only: the others are still written
            log.warning("spool file unreadable (%s): %s", type(exc).__name__, path.name)
            return
        rejected = self._run(self._write_all(records))
        if rejected:
            try:
                self._spool.quarantine(rejected, name=path.stem)
            except OSError as exc:
                log.warning("usage quarantine unwritable (%s): %s stays spooled",
                            type(exc).__name__, path.name)
                return
            _report_rejected(rejected)
        self._spool.remove(path)

    async def _write_all(self, records: list[Any]) -> list[Rejected]:
        """Write the records; return those the store can never take. A transient failure
        (`ServiceUnavailable`) raises: the whole batch is tried again later. Any other failure
        is the records': halves are written in turn until each bad record stands alone."""
        try:
            await self._store.write_usage(records)
        except ServiceUnavailable:
            raise
        except Exception as exc:
            if len(records) == 1:
                reason = exc.reason if isinstance(exc, RecordRejected) else type(exc).__name__
                return [(records[0], reason)]
            mid = len(records) // 2
            return await self._write_all(records[:mid]) + await self._write_all(records[mid:])
        return []

    def _quarantine(self, force: bool = False) -> None:
        """Records rejected outside a spool file (unencodable, or written straight from
        memory) go to a quarantine file of their own."""
        if not self._rejected or not (force or self._spool_retry.due()):
            return
        try:
            self._spool.quarantine(self._rejected)
        except Exception as exc:
            self._spool_retry.failed()
            obs.usage_spool_error()
            log.warning("usage quarantine unwritable (%s): %d rejected records held",
                        type(exc).__name__, len(self._rejected))
            return
        _report_rejected(self._rejected)
        self._rejected = []

    def _final_flush(self, budget_s: float = 10.0) -> None:
        """At shutdown: spool what is held, then try to write what is spooled; what cannot be
        written stays for the next start."""
        self._hold([], force=True)
        if self._started:
            deadline = time.monotonic() + budget_s
            try:
                if self._held:
                    self._rejected += self._run(self._write_all(self._held))
                    self._held = []
                for path in self._spool.pending():
                    if time.monotonic() > deadline:
                        break
                    self._write_file(path)
            except Exception as exc:
                log.warning("usage ledger unavailable at stop (%s): records stay spooled",
                            type(exc).__name__)
        self._quarantine(force=True)
        if self._held or self._rejected:
            log.error("usage writer stopping with %d records it could neither spool nor write",
                      len(self._held) + len(self._rejected))

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)


def _report_rejected(rejected: list[Rejected]) -> None:
    """Count and log records that went to quarantine: ids and reasons, never their content."""
    obs.usage_records_rejected(len(rejected))
    for record, reason in rejected:
        ids = record if isinstance(record, dict) else {}
        log.error("usage record rejected (%s), quarantined: request_id=%.64s tenant_id=%.64s",
                  reason, ids.get("request_id"), ids.get("tenant_id"))


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
