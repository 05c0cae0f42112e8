"""The gateway's data: tenants, their keys, and model routes. Plain values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

PROVIDERS = ("openai", "anthropic", "self-hosted")


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_id: str
    rpm_limit: int
    tpm_limit: int
    allowed_models: tuple[str, ...] = ("*",)
    enabled: bool = True
    created_at: float = 0.0

    def may_use(self, model: str) -> bool:
        return "*" in self.allowed_models or model in self.allowed_models


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A tenant key as stored: only its SHA-256 hash, never the key itself."""

    key_id: str
    tenant_id: str
    key_hash: str
    prefix: str
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    base_url: str
    model: str
    api_key: str | None = None
    api_key_env: str | None = None
    weight: int | None = None

    @property
    def name(self) -> str:
        """A stable, secret-free label for metrics, logs and breakers."""
        return f"{self.provider}:{self.base_url}#{self.model}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    targets: tuple[Target, ...]
    input_price_per_mtok: float = 0.0
    output_price_per_mtok: float = 0.0
    updated_at: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_price_per_mtok + output_tokens * self.output_price_per_mtok
        ) / 1_000_000


@dataclass(slots=True)
class Usage:
    """Tokens of one request. `reported`: the upstream gave every number, and each was valid.
    `generated`: the text of a non-stream reply whose usage was not reported, for the gateway
    to count at the end of the request (off the response's critical path)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reported: bool = field(default=False)
    generated: tuple[str, ...] = ()
