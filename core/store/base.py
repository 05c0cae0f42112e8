"""The store interface: tenants, hashed keys, routes, the usage ledger, and who owns each
response relayed from an upstream that keeps responses.

Two implementations sit behind it: the embedded one (SQLite under GATEWAY_DATA_DIR, shared by all
worker processes of one gateway) and the distributed one (DynamoDB). The request path never
reads the store directly: it goes through `Catalog`, a per-worker cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from llm_gateway.domain import ApiKey, ResponseOwner, Route, Tenant


@dataclass(frozen=True, slots=True)
class UsagePage:
    totals: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


class Store(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the store cannot serve requests (readiness)."""
        ...

    def generation(self) -> int:
        """A number that changes whenever cached reads may be stale. Cheap: called per request."""
        ...

    async def create_tenant(self, tenant: Tenant, key: ApiKey) -> None:
        """Raise Conflict if the tenant exists."""
        ...

    async def get_tenant(self, tenant_id: str) -> Tenant | None: ...

    async def list_tenants(self) -> list[Tenant]: ...

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any]) -> Tenant:
        """Raise NotFound if the tenant does not exist."""
        ...

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete the tenant and all its keys."""
        ...

    async def add_key(self, key: ApiKey) -> None: ...

    async def list_keys(self, tenant_id: str) -> list[ApiKey]: ...

    async def delete_key(self, tenant_id: str, key_id: str) -> bool: ...

    async def find_key(self, key_hash: str) -> tuple[ApiKey, Tenant] | None: ...

    async def put_route(self, route: Route) -> bool:
        """Create or replace; True when created."""
        ...

    async def get_route(self, name: str) -> Route | None: ...

    async def list_routes(self) -> list[Route]: ...

    async def delete_route(self, name: str) -> bool: ...

    async def write_usage(self, records: list[dict[str, Any]]) -> None:
        """Idempotent by request_id: writing a record twice keeps one."""
        ...

    async def query_usage(
        self,
        tenant_id: str,
        start: float | None,
        end: float | None,
        model: str | None,
        limit: int,
        cursor: str | None,
    ) -> UsagePage: ...

    async def put_response_owner(self, owner: ResponseOwner) -> None:
        """Create or replace. Not an admin write: it never moves `generation`."""
        ...

    async def get_response_owner(self, response_id: str) -> ResponseOwner | None:
        """The owner, unless there is none or it has expired."""
        ...

    async def delete_response_owner(self, response_id: str) -> None: ...
