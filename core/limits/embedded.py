"""The embedded limiter: exact across all worker processes of one gateway, no service needed.

The buckets live in a memory-mapped file under the data dir that every worker maps. Each call
takes an exclusive `flock` on the file for the few microseconds the arithmetic needs, so two
workers can never both take the last unit. The table is open addressing (linear probing) over
fixed 64-byte slots keyed by a 128-bit hash of the tenant id. A slot whose buckets have both
refilled (`idle_at` passed) is worth the same as an empty one, so a new tenant may take it: the
table only fills if more than `SLOTS` tenants are active within the same minute or so.

Times come from CLOCK_MONOTONIC (`time.monotonic`), one clock for every process on the machine.
The parent empties the file before forking workers (`reset`), so a restart starts every bucket
full; times from a previous boot (in the future) are treated the same way.

The check runs synchronously inside the async method: it is a few microseconds, cheaper than a
thread hop. The event loop is the only caller in a worker, so the lock never waits on a thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import time
import weakref
from pathlib import Path

from llm_gateway.limits.base import (
    Decision,
    LimiterUnavailable,
    decide,
    decision,
    full_in,
    refill,
)

SLOTS = 1 << 16
_SLOT = struct.Struct("<16s5d")  # tenant hash, requests, requests_at, tokens, tokens_at, idle_at
_SLOT_SIZE = 64
_SIZE = SLOTS * _SLOT_SIZE
_EMPTY = b"\0" * 16
FILE_NAME = "limiter.buckets"


class TableFull(LimiterUnavailable):
    pass


class EmbeddedLimiter:
    def __init__(self, data_dir: Path) -> None:
        self._path = Path(data_dir) / FILE_NAME
        self._fd = -1
        self._map: mmap.mmap | None = None

    @classmethod
    def reset(cls, data_dir: Path) -> None:
        """Create (or empty) the shared table; run once in the parent before workers start."""
        path = Path(data_dir) / FILE_NAME
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a stale temp file keeps its old mode through O_CREAT
            os.ftruncate(fd, _SIZE)
        finally:
            os.close(fd)
        tmp.replace(path)

    async def start(self) -> None:
        self._open()
        # flock belongs to the open file, which a fork shares: a child must open its own.
        ref = weakref.WeakMethod(self._reopen)
        os.register_at_fork(after_in_child=lambda: (m := ref()) and m())

    async def __aenter__(self) -> EmbeddedLimiter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._close()

    async def reserve(self, tenant_id: str, rpm_limit: int, tpm_limit: int,
                      tokens: int) -> Decision:
        key = _key(tenant_id)
        with self._locked() as table:
            now = time.monotonic()
            offset, r, r_at, t, t_at, _ = _find(table, key, now)
            r = refill(r, r_at, rpm_limit, now)
            t = refill(t, t_at, tpm_limit, now)
            allowed, denied, never, wait, r, t = decide(rpm_limit, tpm_limit, tokens, r, t)
            idle_at = now + max(full_in(r, rpm_limit), full_in(t, tpm_limit))
            _SLOT.pack_into(table, offset, key, r, now, t, now, idle_at)
        return decision(allowed, denied, never, wait, rpm_limit, r, tpm_limit, t)

    async def settle(self, tenant_id: str, tpm_limit: int, reserved: int, actual: int) -> None:
        self.settle_now(tenant_id, tpm_limit, reserved, actual)

    def settle_now(self, tenant_id: str, tpm_limit: int, reserved: int, actual: int) -> None:
        """`settle`, synchronously: a few microseconds, less than the task it would run in."""
        if tpm_limit <= 0 or reserved == actual:
            return
        key = _key(tenant_id)
        with self._locked() as table:
            now = time.monotonic()
            offset, r, r_at, t, t_at, idle_at = _find(table, key, now)
            t = min(float(tpm_limit), refill(t, t_at, tpm_limit, now) + reserved - actual)
            # Only the token bucket is known here: never let the slot go idle earlier.
            idle_at = max(idle_at, now + full_in(t, tpm_limit))
            _SLOT.pack_into(table, offset, key, r, r_at, t, now, idle_at)

    async def ping(self) -> None:
        """The table is mapped and its lock can be taken."""
        if self._map is None:
            raise LimiterUnavailable("the embedded limiter is not started")
        with self._locked():
            pass

    def _locked(self) -> _Lock:
        if self._map is None:
            raise RuntimeError("EmbeddedLimiter used before start()")
        return _Lock(self._fd, self._map)

    def _open(self) -> None:
        # O_CREAT without truncation: workers racing here cannot wipe each other's state.
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < _SIZE:
            os.ftruncate(fd, _SIZE)
        self._fd, self._map = fd, mmap.mmap(fd, _SIZE)

    def _close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _reopen(self) -> None:
        if self._map is not None:
            self._close()
            self._open()


class _Lock:
    """`with`: hold the table's exclusive lock; yields the mapped table."""

    __slots__ = ("_fd", "_map")

    def __init__(self, fd: int, table: mmap.mmap) -> None:
        self._fd, self._map = fd, table

    def __enter__(self) -> mmap.mmap:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self._map

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


_Slot = tuple[int, float, float, float, float, float]


def _find(table: mmap.mmap, key: bytes, now: float) -> _Slot:
    """(offset, r, r_at, t, t_at, idle_at) of the tenant's slot; for a new tenant, a free or
    idle slot holding full buckets. Caller holds the lock."""
    start = int.from_bytes(key[:8], "little") % SLOTS
    free = -1
    for probe in range(SLOTS):
        offset = ((start + probe) % SLOTS) * _SLOT_SIZE
        stored, r, r_at, t, t_at, idle_at = _SLOT.unpack_from(table, offset)
        if stored == key:
            if max(r_at, t_at) <= now + 1.0:
                return offset, r, r_at, t, t_at, idle_at
            free = offset  # written under an earlier boot's clock: start over, full
            break
        if free < 0 and (idle_at <= now or idle_at > now + 86_400.0):
            free = offset  # empty, idle, or from an earlier boot
        if stored == _EMPTY:
            break
    if free < 0:
        raise TableFull(f"more than {SLOTS} tenants active at once in the embedded limiter")
    # Infinite levels read as full whatever the limit (settle does not know rpm_limit).
    return free, math.inf, now, math.inf, now, now


_KEYS: dict[str, bytes] = {}
_KEYS_MAX = 4096


def _key(tenant_id: str) -> bytes:
    key = _KEYS.get(tenant_id)
    if key is None:
        key = hashlib.blake2b(tenant_id.encode(), digest_size=16).digest()
        if key == _EMPTY:
            key = b"\1" + key[1:]
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        _KEYS[tenant_id] = key
    return key
