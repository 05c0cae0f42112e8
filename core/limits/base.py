"""The limiter interface and the bucket arithmetic every backend shares.

Each tenant has two buckets, requests (capacity `rpm_limit`) and tokens (capacity `tpm_limit`),
each refilling continuously at capacity/60 per second, as OpenAI describes its own limits. A
request is admitted only if both hold enough; otherwise nothing is taken from either. A limit
of 0 means unlimited. `settle` replaces a reservation with actual usage: it gives back unused
tokens (never above capacity), or takes the overshoot, which may leave the bucket below zero so
that the next requests wait for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class LimiterUnavailable(Exception):
    """The limiter's store cannot be reached."""


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
    async def reserve(
        self, tenant_id: str, rpm_limit: int, tpm_limit: int, tokens: int
    ) -> Decision: ...

    async def settle(self, tenant_id: str, tpm_limit: int, reserved: int, actual: int) -> None:
        ...

    async def aclose(self) -> None: ...


def refill(level: float, since: float, capacity: int, now: float) -> float:
    return min(float(capacity), level + max(0.0, now - since) * capacity / 60.0)


def decide(rpm_limit: int, tpm_limit: int, tokens: int, r: float, t: float
           ) -> tuple[bool, str | None, bool, float, float, float]:
    """Given refilled levels r (requests) and t (tokens): (allowed, denied_by, never_fits,
    retry_after_s, new r, new t)."""
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
        rpm_reset_s=(rpm_limit - r) * 60.0 / rpm_limit if rpm_limit > 0 else 0.0,
        tpm_limit=tpm_limit,
        tpm_remaining=max(0, math.floor(t)) if tpm_limit > 0 else 0,
        tpm_reset_s=(tpm_limit - t) * 60.0 / tpm_limit if tpm_limit > 0 else 0.0,
    )


def duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `120ms`."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(d: Decision) -> dict[str, str]:
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
    return headers
