"""The embedded limiter: exact across all worker processes of one gateway, no service needed.

The buckets live in a small memory-mapped file under GATEWAY_DATA_DIR, shared by every worker;
each check takes an exclusive `flock` on it for the few microseconds the arithmetic needs, so
concurrent requests from different workers can never both take the last unit. The table uses
open addressing over fixed 64-byte slots keyed by a hash of the tenant id. Times come from
CLOCK_MONOTONIC, which all processes on one machine share; the parent resets the file at start
(`reset`), so a restart also starts every bucket full.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from pathlib import Path

from llm_gateway.limits.base import Decision, decide, decision, refill

_SLOTS = 1 << 16
_SLOT = struct.Struct("<16s4d")  # tenant hash, requests, requests_at, tokens, tokens_at
_SLOT_SIZE = 64
_EMPTY = b"\0" * 16
FILE_NAME = "limiter.buckets"


class TableFull(Exception):
    pass


class EmbeddedLimiter:
    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / FILE_NAME
        self._fd = -1
        self._map: mmap.mmap | None = None

    @classmethod
    def reset(cls, data_dir: Path) -> None:
        """Create (or empty) the shared table; run once in the parent before workers start."""
        path = data_dir / FILE_NAME
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.truncate(_SLOTS * _SLOT_SIZE)
        tmp.replace(path)

    async def start(self) -> None:
        if not self._path.exists():
            self.reset(self._path.parent)
        self._fd = os.open(self._path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _SLOTS * _SLOT_SIZE)

    async def aclose(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def reserve(self, tenant_id: str, rpm_limit: int, tpm_limit: int,
                      tokens: int) -> Decision:
        return self.reserve_now(tenant_id, rpm_limit, tpm_limit, tokens)

    def reserve_now(self, tenant_id: str, rpm_limit: int, tpm_limit: int,
                    tokens: int) -> Decision:
        key = _key(tenant_id)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic()
            offset, r, r_at, t, t_at = self._find(key, rpm_limit, tpm_limit, now)
            r = refill(r, r_at, rpm_limit, now)
            t = refill(t, t_at, tpm_limit, now)
            allowed, denied, never, wait, r, t = decide(rpm_limit, tpm_limit, tokens, r, t)
            self._write(offset, key, r, now, t, now)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return decision(allowed, denied, never, wait, rpm_limit, r, tpm_limit, t)

    async def settle(self, tenant_id: str, tpm_limit: int, reserved: int, actual: int) -> None:
        if tpm_limit <= 0 or reserved == actual:
            return
        key = _key(tenant_id)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic()
            offset, r, r_at, t, t_at = self._find(key, 0, tpm_limit, now)
            t = min(float(tpm_limit), refill(t, t_at, tpm_limit, now) + reserved - actual)
            self._write(offset, key, r, r_at, t, now)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _find(self, key: bytes, rpm_limit: int, tpm_limit: int, now: float
              ) -> tuple[int, float, float, float, float]:
        """The tenant's slot (claimed if new: both buckets full). Caller holds the lock."""
        assert self._map is not None, "limiter not started"
        index = int.from_bytes(key[:4], "little") % _SLOTS
        for probe in range(_SLOTS):
            offset = ((index + probe) % _SLOTS) * _SLOT_SIZE
            stored, r, r_at, t, t_at = _SLOT.unpack_from(self._map, offset)
            if stored == key:
                return offset, r, r_at, t, t_at
            if stored == _EMPTY:
                return offset, float(rpm_limit), now, float(tpm_limit), now
        raise TableFull(f"more than {_SLOTS} tenants in the embedded limiter")

    def _write(self, offset: int, key: bytes, r: float, r_at: float, t: float,
               t_at: float) -> None:
        assert self._map is not None
        _SLOT.pack_into(self._map, offset, key, r, r_at, t, t_at)


def _key(tenant_id: str) -> bytes:
    return hashlib.blake2b(tenant_id.encode(), digest_size=16).digest()
