"""Per-tenant RPM/TPM limiters: embedded (one machine, all workers) and Redis (all replicas)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_gateway.limits.base import (
    Decision,
    Limiter,
    LimiterFault,
    LimiterUnavailable,
    rate_limit_headers,
)

if TYPE_CHECKING:
    from llm_gateway.settings import Settings

__all__ = [
    "Decision",
    "Limiter",
    "LimiterFault",
    "LimiterUnavailable",
    "make_limiter",
    "rate_limit_headers",
]


def make_limiter(settings: Settings) -> Limiter:
    """Redis when GATEWAY_REDIS_ADDR is set, else the embedded limiter in the data directory."""
    if settings.redis_addr:
        from llm_gateway.limits.redis import RedisLimiter

        return RedisLimiter(settings.redis_addr, cluster=settings.redis_cluster,
                            timeout_s=settings.limiter_timeout_s)
    from llm_gateway.limits.embedded import EmbeddedLimiter

    return EmbeddedLimiter(settings.data_dir)
