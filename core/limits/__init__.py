"""Per-tenant RPM/TPM limiters: embedded (one machine, all workers) and Redis (all replicas)."""

from llm_gateway.limits.base import (
    Decision,
    Limiter,
    LimiterFault,
    LimiterUnavailable,
    rate_limit_headers,
)

__all__ = ["Decision", "Limiter", "LimiterFault", "LimiterUnavailable", "rate_limit_headers"]
