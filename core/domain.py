"""The gateway's data: tenants, their keys, and model routes. Plain values, no I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


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
        """A stable, secret-free label for metrics, logs, usage records and breakers: the URL
        without userinfo, query or fragment, which a route stored before they were refused may
        still hold."""
        return f"{self.provider}:{public_url(self.base_url)}#{self.model}"


def public_url(url: str) -> str:
    """`url` without the parts that may carry credentials (userinfo, query, fragment)."""
    if "@" not in url and "?" not in url and "#" not in url:
        return url  # the common case, on every attempt: no parsing
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def target_label(name: str) -> str:
    """A label for a `Target.name` that shows no URL at all (for `/readyz`, which anyone who
    reaches the gateway may read): provider#model@ a short hash of the URL."""
    provider, _, rest = name.partition(":")
    url, _, model = rest.partition("#")  # a public URL has no '#'
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{provider}#{model}@{digest}"


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
    to count at the end of the request (off the response's critical path).
    `reasoning_tokens`: the part of `output_tokens` the model spent reasoning, where the
    upstream says (0 otherwise)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reported: bool = field(default=False)
    generated: tuple[str, ...] = ()
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ResponseOwner:
    """Who a response relayed from an upstream that keeps responses (an `openai` target) belongs
    to: its tenant, and the route and target (`Target.name`) that served it, until
    `expires_at` (epoch seconds). The gateway keeps nothing else of the response."""

    response_id: str
    tenant_id: str
    route: str
    target: str
    expires_at: float
