"""A per-worker cache of what the request path reads from the store: keys and routes.

A request never waits on the store when the cache is warm. Entries are dropped when the store's
`generation()` moves: at once on the embedded store (SQLite's data_version), within the cache TTL
on a distributed one.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

from llm_gateway.domain import ApiKey, Route, Tenant
from llm_gateway.store.base import Store

V = TypeVar("V")
_MAX_ENTRIES = 50_000
# One store generation check serves the key and route lookups of one request.
_RECHECK_S = 0.0005


class _Cache(Generic[V]):
    def __init__(self) -> None:
        self.entries: dict[str, V | None] = {}

    def put(self, key: str, value: V | None) -> None:
        # Unknown keys are cached too (as None), so the map is bounded against key spraying.
        if len(self.entries) >= _MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = value


class Catalog:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._generation = -1
        self._checked_at = -1.0
        self._keys: _Cache[tuple[ApiKey, Tenant]] = _Cache()
        self._routes: _Cache[Route] = _Cache()
        self._route_list: list[Route] | None = None

    def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < _RECHECK_S:
            return  # checked a moment ago, by this same request
        self._checked_at = now
        gen = self._store.generation()
        if gen != self._generation:
            self._generation = gen
            self._keys.entries.clear()
            self._routes.entries.clear()
            self._route_list = None

    async def principal(self, key_hash: str) -> tuple[ApiKey, Tenant] | None:
        self._fresh()
        try:
            return self._keys.entries[key_hash]
        except KeyError:
            found = await self._store.find_key(key_hash)
            self._keys.put(key_hash, found)
            return found

    async def route(self, name: str) -> Route | None:
        self._fresh()
        try:
            return self._routes.entries[name]
        except KeyError:
            found = await self._store.get_route(name)
            self._routes.put(name, found)
            return found

    async def routes(self) -> list[Route]:
        self._fresh()
        if self._route_list is None:
            self._route_list = await self._store.list_routes()
        return self._route_list
