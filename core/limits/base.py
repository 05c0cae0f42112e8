"""The limiter interface and the bucket arithmetic every backend shares.

Each tenant has two buckets, requests (capacity `rpm_limit`) and tokens (capacity `tpm_limit`),
each refilling continuously at capacity/60 per second, as OpenAI describes its own limits. A
request is admitted only if both hold enough; otherwise nothing is taken from either. A
reservation larger than `tpm_limit` can never fit and is denied at once (`never_fits`).

A limit <= 0 means unlimited: that bucket is not checked, its remaining/reset are reported as 0
and `rate_limit_headers` leaves its headers out.

`settle` replaces a reservation with actual usage: unused tokens go back (never above capacity);
usage above the reservation is taken too, which may leave the bucket below zero by at most that
overshoot, so the tenant's next requests wait until it has been paid back. Refusing the
overshoot would let a tenant exceed its limit by under-declaring max_tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class LimiterUnavailable(Exception):
    """The limiter has no answer: its store is unreachable, too slow, refusing (Redis' OOM,
    BUSY, READONLY...) or cannot hold another tenant. `GATEWAY_LIMITER_FAILURE_MODE` decides
    whether the request is served (open) or refused with 503 (closed)."""


class LimiterFault(LimiterUnavailable):
    """The store refused in a way no outage explains (an error inside the script, a key of
    another type): the same policy applies, but it is logged as an error."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    denied_by: str | None  # "rpm" | "tpm" | None
    never_fits: bool  # the reservation alone exceeds tpm_limit
    retry_after_s: float  # until enough refills (0 when allowed)
    rpm_limit: int
    rpm_remaining: int
    rpm_reset_s: float  # until the bucket is full again
    tpm_limit: int
    tpm_remaining: int
    tpm_reset_s: float


class Limiter(Protocol):
    async def start(self) -> None:
        """Connect (in each worker, after the fork)."""
        ...

    async def reserve(
        self, tenant_id: str, rpm_limit: int, tpm_limit: int, tokens: int
    ) -> Decision: ...

    async def settle(
        self, tenant_id: str, tpm_limit: int, reserved: int, actual: int
    ) -> None: ...

    async def ping(self) -> None:
        """Raise LimiterUnavailable unless the store can serve a check now (for /readyz)."""
        ...

    async def aclose(self) -> None: ...


def refill(level: float, since: float, capacity: int, now: float) -> float:
    """The level at `now` of a bucket that held `level` at `since`; an unlimited bucket is
    infinite, so it reads as full (not empty) if a limit is set later."""
    if capacity <= 0:
        return math.inf
    return min(float(capacity), level + max(0.0, now - since) * capacity / 60.0)


def full_in(level: float, capacity: int) -> float:
    """Seconds until a bucket at `level` is full again (0 for an unlimited one)."""
    return max(0.0, (capacity - level) * 60.0 / capacity) if capacity > 0 else 0.0


def decide(
    rpm_limit: int, tpm_limit: int, tokens: int, r: float, t: float
) -> tuple[bool, str | None, bool, float, float, float]:
    """Given refilled levels r (requests) and t (tokens): (allowed, denied_by, never_fits,
    retry_after_s, new r, new t). The Redis script is a line-by-line port of this."""
    if tpm_limit > 0 and tokens > tpm_limit:
        return False, "tpm", True, 0.0, r, t
    need_r = 0.0 if rpm_limit <= 0 else max(0.0, 1.0 - r) * 60.0 / rpm_limit
    need_t = 0.0 if tpm_limit <= 0 else max(0.0, tokens - t) * 60.0 / tpm_limit
    if need_r <= 0.0 and need_t <= 0.0:
        return (True, None, False, 0.0, r - 1 if rpm_limit > 0 else r,
                t - tokens if tpm_limit > 0 else t)
    denied = "rpm" if need_r >= need_t else "tpm"
    return False, denied, False, max(need_r, need_t), r, t


def decision(allowed: bool, denied_by: str | None, never_fits: bool, retry_after_s: float,
             rpm_limit: int, r: float, tpm_limit: int, t: float) -> Decision:
    return Decision(
        allowed=allowed,
        denied_by=denied_by,
        never_fits=never_fits,
        retry_after_s=retry_after_s,
        rpm_limit=rpm_limit,
        rpm_remaining=max(0, math.floor(r)) if rpm_limit > 0 else 0,
        rpm_reset_s=full_in(r, rpm_limit),
        tpm_limit=tpm_limit,
        tpm_remaining=max(0, math.floor(t)) if tpm_limit > 0 else 0,
        tpm_reset_s=full_in(t, tpm_limit),
    )


def duration(seconds: float) -> str:
    """OpenAI's reset format: `120ms` below a second, else whole seconds rounded up (`1s`,
    `6m0s`, `1h2m0s`), so a client that waits that long finds the bucket refilled."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(d: Decision) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers, plus `retry-after` (whole seconds, at least 1) and
    `retry-after-ms` (which the OpenAI SDKs prefer) when a retry can succeed."""
    headers: dict[str, str] = {}
    if d.rpm_limit > 0:
        headers["x-ratelimit-limit-requests"] = str(d.rpm_limit)
        headers["x-ratelimit-remaining-requests"] = str(d.rpm_remaining)
        headers["x-ratelimit-reset-requests"] = duration(d.rpm_reset_s)
    if d.tpm_limit > 0:
        headers["x-ratelimit-limit-tokens"] = str(d.tpm_limit)
        headers["x-ratelimit-remaining-tokens"] = str(d.tpm_remaining)
        headers["x-ratelimit-reset-tokens"] = duration(d.tpm_reset_s)
    if not d.allowed and not d.never_fits:
        headers["retry-after"] = str(max(1, math.ceil(d.retry_after_s)))
        headers["retry-after-ms"] = str(max(1, math.ceil(d.retry_after_s * 1000)))
    return headers


def rate_limit_header_bytes(d: Decision) -> tuple[tuple[bytes, bytes], ...]:
    """`rate_limit_headers(d)` as the response's (name, value) byte pairs, built directly
    (the request path's form, once per admitted request)."""
    out: list[tuple[bytes, bytes]] = []
    if d.rpm_limit > 0:
        out += ((b"x-ratelimit-limit-requests", b"%d" % d.rpm_limit),
                (b"x-ratelimit-remaining-requests", b"%d" % d.rpm_remaining),
                (b"x-ratelimit-reset-requests", duration(d.rpm_reset_s).encode()))
    if d.tpm_limit > 0:
        out += ((b"x-ratelimit-limit-tokens", b"%d" % d.tpm_limit),
                (b"x-ratelimit-remaining-tokens", b"%d" % d.tpm_remaining),
                (b"x-ratelimit-reset-tokens", duration(d.tpm_reset_s).encode()))
    if not d.allowed and not d.never_fits:
        out += ((b"retry-after", b"%d" % max(1, math.ceil(d.retry_after_s))),
                (b"retry-after-ms", b"%d" % max(1, math.ceil(d.retry_after_s * 1000))))
    return tuple(out)
