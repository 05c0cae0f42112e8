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
# The cache holds names clients choose (unknown ones too, as None): bounded in the total length
# of its keys as well as in entries, so a flood of long names costs a worker a few MiB at most.
_MAX_KEY_CHARS = 4 * 1024 * 1024
# No route name is longer (the admin API enforces it): a longer one is unknown without a lookup.
_MAX_NAME_CHARS = 256
# One store generation check serves the key and route lookups of one request.
_RECHECK_S = 0.0005


class _Cache(Generic[V]):
    def __init__(self, max_entries: int = _MAX_ENTRIES,
                 max_key_chars: int = _MAX_KEY_CHARS) -> None:
        self.entries: dict[str, V | None] = {}
        self.key_chars = 0
        self._max_entries = max_entries
        self._max_key_chars = max_key_chars

    def put(self, key: str, value: V | None) -> None:
        # Unknown keys are cached too (as None), so the map is bounded against key spraying.
        if key in self.entries:
            self.entries[key] = value
            return
        if (len(self.entries) >= self._max_entries
                or self.key_chars + len(key) > self._max_key_chars):
            self.clear()
        self.entries[key] = value
        self.key_chars += len(key)

    def clear(self) -> None:
        self.entries.clear()
        self.key_chars = 0


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
            self._keys.clear()
            self._routes.clear()
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
        if len(name) > _MAX_NAME_CHARS:
            return None
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
