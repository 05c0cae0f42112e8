"""Per-tenant RPM/TPM limiters: embedded (one machine, all workers) and Redis (all replicas)."""

from llm_gateway.limits.base import (
    Decision,
    Limiter,
    LimiterUnavailable,
    rate_limit_headers,
)

__all__ = ["Decision", "Limiter", "LimiterUnavailable", "rate_limit_headers"]
