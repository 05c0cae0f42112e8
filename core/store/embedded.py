"""The embedded store: one SQLite database under GATEWAY_DATA_DIR, in WAL mode.

Every worker process opens its own connections after the fork. Readers never wait for writers in
WAL mode, so reads run on the event loop (they are cached by `Catalog` and take microseconds);
writes run on one thread per process because a writer may wait for another process's lock.
`generation()` is SQLite's `data_version`, which changes when any other connection commits, so
every worker sees an admin change at its next request.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from llm_gateway.domain import ApiKey, ResponseOwner, Route, Tenant
from llm_gateway.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable, clip
from llm_gateway.ledger import RecordRejected, check_record
from llm_gateway.settings import make_private, make_private_dir
from llm_gateway.store.base import UsagePage
from llm_gateway.store.codec import (
    key_from_row,
    key_to_row,
    route_from_row,
    route_to_row,
    tenant_from_row,
    tenant_to_row,
)

MAIN_FILE = "gateway.sqlite3"
LEDGER_FILE = "usage.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant_id);
CREATE TABLE IF NOT EXISTS routes (
    name TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger.usage (
    request_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger.usage_by_tenant_time ON usage (tenant_id, started_at, request_id);
CREATE TABLE IF NOT EXISTS ledger.response_owners (
    response_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    route TEXT NOT NULL,
    target TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger.response_owners_by_expiry ON response_owners (expires_at);
"""


def _create_private(data_dir: Path) -> None:
    """Provider keys sit in these files in plain text: owner-only. SQLite gives a database's WAL
    and shared-memory files its mode, so creating the databases 0600 covers those; files an
    older version left readable are tightened too."""
    make_private_dir(data_dir)
    for name in (MAIN_FILE, LEDGER_FILE):
        path = data_dir / name
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in ("", "-wal", "-shm", "-journal"):
            make_private(path.with_name(name + suffix))


def _connect(path: Path) -> sqlite3.Connection:
    """The usage ledger is a database of its own (attached as `ledger`): its constant writes
    must not move the main database's data_version, which invalidates the workers' caches."""
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("ATTACH DATABASE ? AS ledger", (str(path.with_name(LEDGER_FILE)),))
    for schema in ("main", "ledger"):
        conn.execute(f"PRAGMA {schema}.journal_mode=WAL")
        conn.execute(f"PRAGMA {schema}.synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class EmbeddedStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / MAIN_FILE
        self._read: sqlite3.Connection | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None

    @staticmethod
    def initialize(data_dir: Path) -> None:
        """Create the schema; run once in the parent before workers start."""
        _create_private(data_dir)
        conn = _connect(data_dir / MAIN_FILE)
        with conn:
            conn.executescript(SCHEMA)
        conn.close()

    async def start(self) -> None:
        self.initialize(self.path.parent)
        self._read = _connect(self.path)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._write_conn = _connect(self.path)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        for conn in (self._read, self._write_conn):
            if conn is not None:
                conn.close()

    @property
    def _r(self) -> sqlite3.Connection:
        assert self._read is not None, "store not started"
        return self._read

    async def _write(self, fn: Any, *args: Any) -> Any:
        assert self._writer is not None and self._write_conn is not None
        conn = self._write_conn

        def run() -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, run)
        except sqlite3.OperationalError as exc:
            raise ServiceUnavailable(f"embedded store is busy: {exc}") from None

    async def ping(self) -> None:
        self._r.execute("SELECT 1").fetchone()

    def generation(self) -> int:
        row = self._r.execute("PRAGMA main.data_version").fetchone()
        return int(row[0])

    async def create_tenant(self, tenant: Tenant, key: ApiKey) -> None:
        def tx(c: sqlite3.Connection) -> None:
            try:
                c.execute(
                    "INSERT INTO tenants VALUES (?, ?)",
                    (tenant.tenant_id, orjson.dumps(tenant_to_row(tenant))),
                )
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"tenant {tenant.tenant_id!r} already exists", code="tenant_exists"
                ) from None
            _insert_key(c, key)

        await self._write(tx)

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self._r.execute(
            "SELECT body FROM tenants WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return tenant_from_row(orjson.loads(row[0])) if row else None

    async def list_tenants(self) -> list[Tenant]:
        rows = self._r.execute("SELECT body FROM tenants ORDER BY tenant_id").fetchall()
        return [tenant_from_row(orjson.loads(r[0])) for r in rows]

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any]) -> Tenant:
        def tx(c: sqlite3.Connection) -> Tenant:
            row = c.execute(
                "SELECT body FROM tenants WHERE tenant_id = ?", (tenant_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"tenant {clip(tenant_id)!r} not found", code="tenant_not_found")
            data = orjson.loads(row[0])
            data.update(changes)
            c.execute(
                "UPDATE tenants SET body = ? WHERE tenant_id = ?", (orjson.dumps(data), tenant_id)
            )
            return tenant_from_row(data)

        result: Tenant = await self._write(tx)
        return result

    async def delete_tenant(self, tenant_id: str) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM api_keys WHERE tenant_id = ?", (tenant_id,))
            return c.execute("DELETE FROM tenants WHERE tenant_id = ?", (tenant_id,)).rowcount > 0

        result: bool = await self._write(tx)
        return result

    async def add_key(self, key: ApiKey) -> None:
        def tx(c: sqlite3.Connection) -> None:
            if c.execute("SELECT 1 FROM tenants WHERE tenant_id = ?", (key.tenant_id,)).fetchone():
                _insert_key(c, key)
            else:
                raise NotFound(f"tenant {key.tenant_id!r} not found", code="tenant_not_found")

        await self._write(tx)

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        rows = self._r.execute(
            "SELECT body FROM api_keys WHERE tenant_id = ? ORDER BY key_id", (tenant_id,)
        ).fetchall()
        return [key_from_row(orjson.loads(r[0])) for r in rows]

    async def delete_key(self, tenant_id: str, key_id: str) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "DELETE FROM api_keys WHERE tenant_id = ? AND key_id = ?", (tenant_id, key_id)
            )
            return cur.rowcount > 0

        result: bool = await self._write(tx)
        return result

    async def find_key(self, key_hash: str) -> tuple[ApiKey, Tenant] | None:
        row = self._r.execute(
            "SELECT k.body, t.body FROM api_keys k JOIN tenants t ON t.tenant_id = k.tenant_id"
            " WHERE k.key_hash = ?",
            (key_hash,),
        ).fetchone()
        if row is None:
            return None
        return key_from_row(orjson.loads(row[0])), tenant_from_row(orjson.loads(row[1]))

    async def put_route(self, route: Route) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            existed = c.execute("SELECT 1 FROM routes WHERE name = ?", (route.name,)).fetchone()
            c.execute(
                "INSERT OR REPLACE INTO routes VALUES (?, ?)",
                (route.name, orjson.dumps(route_to_row(route))),
            )
            return existed is None

        result: bool = await self._write(tx)
        return result

    async def get_route(self, name: str) -> Route | None:
        row = self._r.execute("SELECT body FROM routes WHERE name = ?", (name,)).fetchone()
        return route_from_row(orjson.loads(row[0])) if row else None

    async def list_routes(self) -> list[Route]:
        rows = self._r.execute("SELECT body FROM routes ORDER BY name").fetchall()
        return [route_from_row(orjson.loads(r[0])) for r in rows]

    async def delete_route(self, name: str) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM routes WHERE name = ?", (name,)).rowcount > 0

        result: bool = await self._write(tx)
        return result

    async def write_usage(self, records: list[dict[str, Any]]) -> None:
        """All the records or none. RecordRejected if one of them can never be written (the
        writer then finds which); ServiceUnavailable if the database is busy or failing."""
        rows = [_usage_row(r) for r in records]

        def tx(c: sqlite3.Connection) -> None:
            # INSERT OR IGNORE: a replayed record (same request_id) is never counted twice.
            c.executemany(
                "INSERT OR IGNORE INTO ledger.usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
            )

        try:
            await self._write(tx)
        except (sqlite3.IntegrityError, sqlite3.DataError) as exc:  # a constraint, a size
            raise RecordRejected(type(exc).__name__) from None

    async def query_usage(
        self,
        tenant_id: str,
        start: float | None,
        end: float | None,
        model: str | None,
        limit: int,
        cursor: str | None,
    ) -> UsagePage:
        where = "tenant_id = ? AND started_at >= ? AND started_at < ?"
        args: list[Any] = [tenant_id, start or 0.0, end or time.time() + 86400 * 365]
        if model:
            where += " AND model = ?"
            args.append(model)
        totals_row = self._r.execute(
            "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
            f" COALESCE(SUM(cost), 0) FROM ledger.usage WHERE {where}",
            args,
        ).fetchone()
        page_where, page_args = where, list(args)
        if cursor:
            after_t, after_id = _decode_cursor(cursor)
            page_where += " AND (started_at, request_id) > (?, ?)"
            page_args += [after_t, after_id]
        rows = self._r.execute(
            f"SELECT body, started_at, request_id FROM ledger.usage WHERE {page_where}"
            " ORDER BY started_at, request_id LIMIT ?",
            [*page_args, limit + 1],
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1][1], rows[-1][2]) if more and rows else None
        return UsagePage(
            totals={
                "requests": totals_row[0],
                "input_tokens": totals_row[1],
                "output_tokens": totals_row[2],
                "cost": totals_row[3],
            },
            records=[orjson.loads(r[0]) for r in rows],
            next_cursor=next_cursor,
        )


    # Response owners live in the ledger's database: their writes, one per relayed response, must
    # not move the main database's data_version (the workers' cache generation).
    async def put_response_owner(self, owner: ResponseOwner) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO ledger.response_owners VALUES (?, ?, ?, ?, ?)",
                      (owner.response_id, owner.tenant_id, owner.route, owner.target,
                       owner.expires_at))
            # Expired owners go as new ones come: a bounded delete through the expiry index.
            c.execute("DELETE FROM ledger.response_owners WHERE rowid IN (SELECT rowid FROM"
                      " ledger.response_owners WHERE expires_at < ? LIMIT 16)", (time.time(),))

        await self._write(tx)

    async def get_response_owner(self, response_id: str) -> ResponseOwner | None:
        row = self._r.execute(
            "SELECT response_id, tenant_id, route, target, expires_at FROM"
            " ledger.response_owners WHERE response_id = ? AND expires_at > ?",
            (response_id, time.time())).fetchone()
        return ResponseOwner(*row) if row else None

    async def delete_response_owner(self, response_id: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM ledger.response_owners WHERE response_id = ?", (response_id,))

        await self._write(tx)


def _usage_row(r: dict[str, Any]) -> tuple[Any, ...]:
    check_record(r)
    try:
        body = orjson.dumps(r)
    except TypeError:  # orjson.JSONEncodeError: a field outside the ones checked
        raise RecordRejected("unserializable") from None
    # A null cost (not a finite number) counts as 0 in totals; the body keeps the null.
    cost = 0.0 if r["cost"] is None else float(r["cost"])
    return (r["request_id"], r["tenant_id"], float(r["started_at"]), r["model"],
            r["input_tokens"], r["output_tokens"], cost, body)


def _insert_key(c: sqlite3.Connection, key: ApiKey) -> None:
    try:
        c.execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?)",
            (key.key_id, key.tenant_id, key.key_hash, orjson.dumps(key_to_row(key))),
        )
    except sqlite3.IntegrityError:
        raise Conflict("that API key is already in use", code="api_key_exists") from None


def _encode_cursor(started_at: float, request_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([started_at, request_id])).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        t, rid = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(t), str(rid)
    except (ValueError, TypeError):
        raise InvalidRequest("invalid cursor", param="cursor") from None
