"""Getting usage records from workers to the ledger without losing one.

    worker --emit--> multiprocessing queue --> usage writer --> spool file (fsync) --> store
       \\--(queue too deep)--> spool file --------------------------/

The writer puts every batch it takes off the queue into a spool file (fsync'd) before writing it
to the store, and deletes the file only once the store has it all. So a writer killed mid-batch,
a store that is down or throttling, or a gateway restart only delays records: whatever is in the
spool is written later, and since the ledger is idempotent by `request_id`, writing a record
twice keeps one.

A record the store can never accept (`RecordRejected`, or one that cannot even be encoded) is
not retried forever ahead of the rest: it goes to `usage-spool/quarantine/`, written like a
spool file, one `{"reason", "record"}` line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import select
import struct
import time
from pathlib import Path
from typing import Any, TypedDict

import orjson
from llm_gateway import observability as obs

SPOOL_DIR = "usage-spool"
QUARANTINE_DIR = "quarantine"
# Usage values above this are clamped (the largest integer a JSON double holds exactly).
MAX_TOKENS = 2**53

log = logging.getLogger("llm_gateway.ledger")


class UsageRecord(TypedDict):
    """One request's usage, as workers hand it to the writer and the stores keep it. The writer
    still checks what it reads (`check_record`): a queue or a spool file may hold anything."""

    request_id: str
    client_request_id: str | None
    tenant_id: str
    key_id: str
    model: str
    provider: str | None
    target: str | None
    input_tokens: int
    output_tokens: int
    cost: float | None
    status: int
    latency_ms: float
    ttft_ms: float | None
    stream: bool
    started_at: float
    usage_source: str  # "upstream" (reported) or "counted" (by the gateway)
    endpoint: str  # the ingress: "chat.completions", "messages", "embeddings", ...
    cached_input_tokens: int  # of input_tokens, read from the upstream's prompt cache
    reasoning_tokens: int  # of output_tokens, spent reasoning (where the upstream says)

# A record the store can never accept, with why (an exception type or a store's error code).
Rejected = tuple[Any, str]


class RecordRejected(Exception):
    """A store refused a usage record for what it holds, not because the store is away:
    writing it again can never succeed. `reason` is a code, never the record's content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_record(r: Any) -> None:
    """What both stores need of a record; raises RecordRejected naming the first bad field."""
    if not isinstance(r, dict):
        raise RecordRejected("not_an_object")
    for name in ("request_id", "tenant_id"):
        if not isinstance(r.get(name), str) or not r[name]:
            raise RecordRejected(f"bad_{name}")
    if not isinstance(r.get("model"), str):
        raise RecordRejected("bad_model")
    if not _finite(r.get("started_at")):
        raise RecordRejected("bad_started_at")
    for name in ("input_tokens", "output_tokens"):
        n = r.get(name)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOKENS:
            raise RecordRejected(f"bad_{name}")
    if r.get("cost") is not None and not _finite(r["cost"]):
        raise RecordRejected("bad_cost")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def encode(records: list[Any]) -> tuple[bytes, list[Rejected]]:
    """Spool lines for the records orjson can encode; the others, rejected (an int above 64
    bits, a lone surrogate): no store could take them either."""
    lines: list[bytes] = []
    rejected: list[Rejected] = []
    for r in records:
        try:
            lines.append(orjson.dumps(r) + b"\n")
        except TypeError as exc:  # orjson.JSONEncodeError
            rejected.append((r, type(exc).__name__))
    return b"".join(lines), rejected


class Spool:
    """A directory of batch files, each written once (tmp + fsync + rename), never appended.

    Writing raises OSError when the directory cannot take a file (disk full, read-only, gone):
    the caller still holds the records and decides where they go meanwhile."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / SPOOL_DIR
        # Created again at each write if need be: a spool that is away at start comes back.
        with contextlib.suppress(OSError):
            self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[Any], origin: str = "w") -> list[Rejected]:
        """Write the records as one new batch file; return those that cannot be encoded."""
        data, rejected = encode(records)
        if data:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_file(self.dir, f"{time.time_ns():020d}-{origin}-{os.getpid()}", data)
        return rejected

    def quarantine(self, rejected: list[Rejected], name: str | None = None) -> Path:
        """Keep records that can never be written, with why, out of the way of the rest.
        `name` (a spool file's) makes a replay of that file overwrite, not add."""
        folder = self.dir / QUARANTINE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        data = b"".join(_quarantine_line(r, reason) for r, reason in rejected)
        return _write_file(folder, name or f"{time.time_ns():020d}-q-{os.getpid()}", data)

    def pending(self) -> list[Path]:
        """Batch files oldest first. A `.tmp` left by a process killed mid-write holds records
        it had taken; its complete lines are replayed too (the torn last one cannot be). A
        `.tmp` whose process lives is being written right now (a worker's spill): not yet.
        None while the directory cannot be read."""
        try:
            return sorted((p for p in self.dir.iterdir()
                           if p.suffix == ".jsonl" or (p.suffix == ".tmp" and _orphaned(p))),
                          key=lambda p: p.name)
        except OSError:
            return []

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        records = []
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                records.append(orjson.loads(line))
        return records

    @staticmethod
    def remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def count(self) -> int:
        total = 0
        for p in self.pending():
            with contextlib.suppress(OSError):
                total += len(p.read_bytes().splitlines())
        return total


def _write_file(folder: Path, name: str, data: bytes) -> Path:
    """`folder/name.jsonl`, complete or not at all: tmp + fsync + rename."""
    tmp = folder / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    path = tmp.with_suffix(".jsonl")
    os.replace(tmp, path)
    return path


def _quarantine_line(record: Any, reason: str) -> bytes:
    try:
        return orjson.dumps({"reason": reason, "record": _jsonable(record)}) + b"\n"
    except Exception:  # too deep to walk: keep what can be shown
        return orjson.dumps({"reason": reason, "record": repr(record)[:65536]
                             .encode("utf-8", "replace").decode()}) + b"\n"


def _jsonable(value: Any) -> Any:
    """The record as JSON can show it: what orjson cannot encode becomes its repr."""
    if isinstance(value, dict):
        return {_jsonable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    try:
        orjson.dumps(value)
    except TypeError:
        return repr(value).encode("utf-8", "replace").decode()
    return value


def _orphaned(tmp: Path) -> bool:
    """Whether the process named in the file (`<ns>-<origin>-<pid>.tmp`) is gone."""
    try:
        pid = int(tmp.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True  # the caller is single-threaded: its own file is never half-written now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# Records emitted within this long of each other go on the queue as one list: one pickle and
# one pipe write per batch instead of per request.
GATHER_S = 0.002
# A pipe write of at most this many bytes is atomic: whole, or (non-blocking) not at all.
_ATOMIC = select.PIPE_BUF
_HEADER = struct.Struct("!i")  # multiprocessing.Connection's frame: big-endian length


class QueueSink:
    """The workers' side: hand records to the writer; never block or fail the request path.

    Each queue item is a list of records. `flush()` (at worker stop) hands over what is still
    gathering; a worker killed outright loses at most the last `GATHER_S` of records. When the
    queue is too deep the records spill to the spool; if the spool cannot take them they go on
    the queue after all (it is unbounded), and if that fails too they wait here for the next
    flush.

    A batch goes straight into the queue's pipe from the event loop (`_DirectPipe`), in frames
    the pipe takes whole or not at all, so the worker needs no feeder thread (the thread, its
    wake-ups and its contention for the GIL cost more CPU than the records themselves). Only a
    frame the pipe cannot take at once (the writer is behind, another worker is writing, a
    record over 4 KiB) goes through `Queue.put_nowait` and its feeder thread, as before; once
    the feeder thread has started, this worker's later batches follow it there too (the queue
    keeps a process's items in order)."""

    def __init__(self, queue: Any, spool: Spool, max_depth: int) -> None:
        self._queue = queue
        self._spool = spool
        self._max_depth = max_depth
        self._gathering: list[UsageRecord] = []
        self._retry: asyncio.TimerHandle | None = None
        self._direct = _DirectPipe(queue)

    def emit(self, record: UsageRecord) -> None:
        self._gathering.append(record)
        if len(self._gathering) == 1:
            asyncio.get_running_loop().call_later(GATHER_S, self.flush)

    def flush(self) -> None:
        records, self._gathering = self._gathering, []
        if not records:
            return
        if self._depth_ok() and self._put(records):
            return
        try:
            rejected = self._spool.write(records, origin="spill")
        except Exception as exc:
            obs.usage_spool_error()
            log.warning("usage spool unwritable (%s): %d records go on the queue",
                        type(exc).__name__, len(records))
            if not self._put(records):
                self._keep(records)
            return
        if rejected:
            self._put([r for r, _ in rejected])  # the writer quarantines them

    def _depth_ok(self) -> bool:
        try:
            return bool(self._queue.qsize() < self._max_depth)
        except (OSError, ValueError, NotImplementedError):
            return False

    def _put(self, records: list[Any]) -> bool:
        records = self._direct.send(records)
        if not records:
            return True
        try:
            self._queue.put_nowait(records)
        except (OSError, ValueError, AssertionError):
            return False  # a closed or unusable queue
        return True

    def _keep(self, records: list[UsageRecord]) -> None:
        """Neither the queue nor the spool took them: they join the next flush, which runs
        after the next record or, at the latest, a second from now."""
        self._gathering[:0] = records
        with contextlib.suppress(RuntimeError):  # no running loop: the next emit retries
            if self._retry is None or self._retry.cancelled() or self._retry.when() < \
                    asyncio.get_running_loop().time():
                self._retry = asyncio.get_running_loop().call_later(1.0, self.flush)

    def depth(self) -> int:
        try:
            return int(self._queue.qsize())
        except (OSError, NotImplementedError):
            return 0


class _DirectPipe:
    """Writes lists of records into a `multiprocessing.Queue`'s pipe as `Queue.put` would have
    (the same frame, under the queue's write lock and its size semaphore, so `get()` and
    `qsize()` see nothing different), from the calling thread and without ever blocking: each
    frame is one write of at most PIPE_BUF bytes on a non-blocking descriptor of the pipe's
    own (opened through /proc, so the other writers' descriptors stay blocking), which the
    kernel takes whole or refuses. Records it did not write are returned to the caller.

    Disabled (everything returned) where the queue or the platform lacks what this needs."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue
        self._fd = -1
        self._pid = 0
        writer, self._sem, self._lock = (getattr(queue, name, None)
                                         for name in ("_writer", "_sem", "_wlock"))
        self._enabled = writer is not None and self._sem is not None and self._lock is not None

    def send(self, records: list[Any]) -> list[Any]:
        if getattr(self._queue, "_thread", None) is not None:
            # This process has put items through the feeder thread, which may still hold some:
            # writing past them would break the queue's order. From now on it all goes there.
            return records
        fd = self._open()
        if fd < 0:
            return records
        try:
            frame = pickle.dumps(records)
        except Exception:
            return records  # Queue.put's feeder thread logs what cannot be pickled
        if len(frame) + _HEADER.size > _ATOMIC:
            if len(records) == 1:
                return records
            half = len(records) // 2
            return self.send(records[:half]) + self.send(records[half:])
        if not self._sem.acquire(False):  # type: ignore[union-attr]
            return records
        written = False
        try:
            # Held by another writer for one write, unless it is a feeder thread blocked on
            # a full pipe: then give up after a millisecond.
            if self._lock.acquire(True, 0.001):  # type: ignore[union-attr]
                try:
                    os.write(fd, _HEADER.pack(len(frame)) + frame)
                    written = True
                finally:
                    self._lock.release()  # type: ignore[union-attr]
        except BlockingIOError:
            pass  # the pipe is full: the writer is behind
        except OSError:
            self._close()
            self._enabled = False
        finally:
            if not written:
                self._sem.release()  # type: ignore[union-attr]
        return [] if written else records

    def _open(self) -> int:
        """This process's non-blocking descriptor of the pipe (a worker forked after the sink
        was made opens its own)."""
        if not self._enabled:
            return -1
        pid = os.getpid()
        if self._pid != pid:
            self._fd, self._pid = -1, pid  # a descriptor inherited from the parent: not ours
            try:
                self._fd = os.open(f"/proc/self/fd/{self._queue._writer.fileno()}",
                                   os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except (OSError, AttributeError, ValueError):
                self._enabled = False
        return self._fd

    def _close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
