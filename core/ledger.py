"""Getting usage records from workers to the ledger without losing one.

    worker --emit--> multiprocessing queue --> usage writer --> spool file (fsync) --> store
       \\--(queue too deep)--> spool file --------------------------/

The writer puts every batch it takes off the queue into a spool file (fsync'd) before writing it
to the store, and deletes the file only once the store has it all. So a writer killed mid-batch,
a store that is down or throttling, or a gateway restart only delays records: whatever is in the
spool is written later, and since the ledger is idempotent by `request_id`, writing a record
twice keeps one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import orjson

SPOOL_DIR = "usage-spool"


class Spool:
    """A directory of batch files, each written once (tmp + fsync + rename), never appended."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / SPOOL_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[dict[str, Any]], origin: str = "w") -> Path:
        name = f"{time.time_ns():020d}-{origin}-{os.getpid()}"
        tmp = self.dir / f"{name}.tmp"
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        path = tmp.with_suffix(".jsonl")
        os.replace(tmp, path)
        return path

    def pending(self) -> list[Path]:
        """Batch files oldest first. A `.tmp` left by a process killed mid-write holds records
        it had taken; its complete lines are replayed too (the torn last one cannot be). A
        `.tmp` whose process lives is being written right now (a worker's spill): not yet."""
        return sorted((p for p in self.dir.iterdir()
                       if p.suffix == ".jsonl" or (p.suffix == ".tmp" and _orphaned(p))),
                      key=lambda p: p.name)

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
        return sum(len(p.read_bytes().splitlines()) for p in self.pending())


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
# one wake-up of the queue's feeder thread per batch instead of per request.
GATHER_S = 0.002


class QueueSink:
    """The workers' side: hand records to the writer; never block the request path.

    Each queue item is a list of records. `flush()` (at worker stop) hands over what is still
    gathering; a worker killed outright loses at most the last `GATHER_S` of records."""

    def __init__(self, queue: Any, spool: Spool, max_depth: int) -> None:
        self._queue = queue
        self._spool = spool
        self._max_depth = max_depth
        self._gathering: list[dict[str, Any]] = []

    def emit(self, record: dict[str, Any]) -> None:
        self._gathering.append(record)
        if len(self._gathering) == 1:
            asyncio.get_running_loop().call_later(GATHER_S, self.flush)

    def flush(self) -> None:
        records, self._gathering = self._gathering, []
        if not records:
            return
        try:
            if self._queue.qsize() < self._max_depth:
                self._queue.put_nowait(records)
                return
        except (OSError, ValueError, NotImplementedError):
            pass  # a closed or unusable queue: the spool still takes them
        self._spool.write(records, origin="spill")

    def depth(self) -> int:
        try:
            return int(self._queue.qsize())
        except (OSError, NotImplementedError):
            return 0
