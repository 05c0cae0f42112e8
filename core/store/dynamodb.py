"""The DynamoDB store (aioboto3): tenants, hashed keys and routes in the main table, the usage
ledger in its own table. The design and access patterns are in `dynamodb_tables`.

Values are kept as one JSON string attribute (`body`) per item, so nothing goes through
DynamoDB's Decimal numbers; usage items also carry their numbers as attributes for totals.
Admin writes are conditional: creating an existing tenant or key is a 409; a tenant update
is a compare-and-swap on `version`, retried against the fresh item, so no update is lost and
only a write that keeps losing the race gets a 409. botocore errors are translated in `_calls`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aioboto3
import orjson
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from llm_gateway.domain import ApiKey, ResponseOwner, Route, Tenant
from llm_gateway.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable, clip
from llm_gateway.ledger import RecordRejected, check_record
from llm_gateway.settings import Settings
from llm_gateway.store.base import UsagePage
from llm_gateway.store.codec import (
    key_from_row,
    key_to_row,
    route_from_row,
    route_to_row,
    tenant_from_row,
    tenant_to_row,
)
from llm_gateway.store.dynamodb_tables import (
    BATCH_WRITE_MAX,
    KEY_SK_PREFIX,
    KEYHASH_PK_PREFIX,
    KEYHASH_SK,
    RESPONSE_PK_PREFIX,
    RESPONSE_SK,
    ROUTES_PK,
    TENANT_PK_PREFIX,
    TENANTS_PK,
    TTL_ATTRIBUTE,
    Tables,
    main_table_spec,
    time_bound,
    usage_sort_key,
    usage_table_spec,
)

_CONDITIONAL = ("ConditionalCheckFailedException", "TransactionCanceledException")
_UPDATE_ATTEMPTS = 5
_BATCH_ATTEMPTS = 8
_BATCH_CONCURRENCY = 4
# Errors that name the request (an item too large, a bad attribute), not the service: sending
# the same items again can never succeed. Throttling, 5xx and connection errors are transient.
_REJECTING = ("ValidationException", "SerializationException")


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: float) -> dict[str, str]:
    return {"N": repr(value) if isinstance(value, float) else str(value)}


def _body(item: dict[str, Any]) -> Any:
    return orjson.loads(item["body"]["S"])


def _item(pk: str, sk: str, body: dict[str, Any], **extra: dict[str, str]) -> dict[str, Any]:
    return {"pk": _s(pk), "sk": _s(sk), "body": _s(orjson.dumps(body).decode()), **extra}


def _reasons(exc: ClientError) -> list[str]:
    """The per-item codes of a cancelled transaction ('None' for items that were fine)."""
    return [r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])]


class DynamoDBStore:
    def __init__(self, settings: Settings) -> None:
        assert settings.dynamodb_table_name, "DYNAMODB_TABLE_NAME is not set"
        self.tables = Tables.named(settings.dynamodb_table_name,
                                   settings.dynamodb_usage_table_name)
        self._settings = settings
        self._session = aioboto3.Session()
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._local_writes = 0

    async def start(self) -> None:
        s = self._settings
        # Short timeouts: an unreachable table must fail fast (503 or spooled usage), not hang.
        config = Config(connect_timeout=2, read_timeout=5, max_pool_connections=32,
                        retries={"mode": "standard", "max_attempts": 2})
        self._client = await self._stack.enter_async_context(self._session.client(
            "dynamodb", region_name=s.aws_region, endpoint_url=s.dynamodb_endpoint_url,
            config=config))
        if s.create_tables:
            await self.create_tables()

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None

    @property
    def _c(self) -> Any:
        assert self._client is not None, "store not started"
        return self._client

    @asynccontextmanager
    async def _calls(self) -> AsyncIterator[None]:
        """Translate botocore's errors; conditional failures pass through for the caller."""
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _CONDITIONAL:
                raise
            if code == "ResourceNotFoundException":
                raise ServiceUnavailable(
                    f"DynamoDB table missing ({self.tables.main} / {self.tables.usage}):"
                    " run `llm-gateway init-dynamodb`", code="store_unavailable") from None
            raise ServiceUnavailable(f"DynamoDB error: {code}", code="store_unavailable",
                                     retryable=True) from None
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise ServiceUnavailable(f"DynamoDB unreachable: {type(exc).__name__}",
                                     code="store_unavailable", retryable=True) from None

    async def create_tables(self) -> None:
        """Create whichever table is missing and wait until it is active. Idempotent."""
        async with self._calls():
            for spec in (main_table_spec(self.tables.main), usage_table_spec(self.tables.usage)):
                try:
                    await self._c.describe_table(TableName=spec["TableName"])
                    continue
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                        raise
                try:
                    await self._c.create_table(**spec)
                except ClientError as exc:  # another replica created it a moment ago
                    if exc.response["Error"]["Code"] != "ResourceInUseException":
                        raise
                await self._c.get_waiter("table_exists").wait(
                    TableName=spec["TableName"], WaiterConfig={"Delay": 1, "MaxAttempts": 120})

    async def ping(self) -> None:
        await self._get("PING", "PING")

    def generation(self) -> int:
        """Moves every cache TTL (so other replicas' admin changes show within it) and at once
        on this worker's own admin writes."""
        ttl = self._settings.cache_ttl_s
        epoch = int(time.monotonic() // ttl) if ttl > 0 else time.monotonic_ns()
        return hash((epoch, self._local_writes))

    async def _get(self, pk: str, sk: str) -> dict[str, Any] | None:
        async with self._calls():
            r = await self._c.get_item(TableName=self.tables.main,
                                       Key={"pk": _s(pk), "sk": _s(sk)}, ConsistentRead=True)
        item: dict[str, Any] | None = r.get("Item")
        return item

    async def _query(self, pk: str, prefix: str = "") -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "TableName": self.tables.main, "ConsistentRead": True,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": _s(pk)},
        }
        if prefix:
            kwargs["KeyConditionExpression"] += " AND begins_with(sk, :p)"
            kwargs["ExpressionAttributeValues"][":p"] = _s(prefix)
        items: list[dict[str, Any]] = []
        async with self._calls():
            while True:
                r = await self._c.query(**kwargs)
                items += r.get("Items", [])
                if "LastEvaluatedKey" not in r:
                    return items
                kwargs["ExclusiveStartKey"] = r["LastEvaluatedKey"]

    async def _delete(self, pk: str, sk: str) -> dict[str, Any] | None:
        """Delete one item; its old attributes, or None if there was none."""
        self._local_writes += 1
        async with self._calls():
            r = await self._c.delete_item(TableName=self.tables.main,
                                          Key={"pk": _s(pk), "sk": _s(sk)}, ReturnValues="ALL_OLD")
        old: dict[str, Any] | None = r.get("Attributes")
        return old

    async def _transact(self, items: list[dict[str, Any]]) -> list[str] | None:
        """Run a write transaction; None on success, else the per-item cancellation codes."""
        self._local_writes += 1
        try:
            async with self._calls():
                await self._c.transact_write_items(TransactItems=items)
        except ClientError as exc:
            return _reasons(exc) or ["unknown"]
        return None

    def _key_puts(self, key: ApiKey) -> list[dict[str, Any]]:
        row = key_to_row(key)
        main = self.tables.main
        return [
            {"Put": {"TableName": main, "Item": _item(
                TENANT_PK_PREFIX + key.tenant_id, KEY_SK_PREFIX + key.key_id, row,
                key_hash=_s(key.key_hash))}},
            {"Put": {"TableName": main, "ConditionExpression": "attribute_not_exists(pk)",
                     "Item": _item(KEYHASH_PK_PREFIX + key.key_hash, KEYHASH_SK, row)}},
        ]

    async def create_tenant(self, tenant: Tenant, key: ApiKey) -> None:
        put_tenant = {"Put": {
            "TableName": self.tables.main, "ConditionExpression": "attribute_not_exists(pk)",
            "Item": _item(TENANTS_PK, tenant.tenant_id, tenant_to_row(tenant), version=_n(1)),
        }}
        reasons = await self._transact([put_tenant, *self._key_puts(key)])
        if reasons is None:
            return
        if reasons[0] == "ConditionalCheckFailed":
            raise Conflict(f"tenant {tenant.tenant_id!r} already exists", code="tenant_exists")
        if reasons[-1] == "ConditionalCheckFailed":
            raise Conflict("that API key is already in use", code="api_key_exists")
        raise Conflict(f"concurrent change, try again ({', '.join(reasons)})")

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        item = await self._get(TENANTS_PK, tenant_id)
        return tenant_from_row(_body(item)) if item else None

    async def list_tenants(self) -> list[Tenant]:
        return [tenant_from_row(_body(i)) for i in await self._query(TENANTS_PK)]

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any]) -> Tenant:
        for _ in range(_UPDATE_ATTEMPTS):
            item = await self._get(TENANTS_PK, tenant_id)
            if item is None:
                raise NotFound(f"tenant {clip(tenant_id)!r} not found", code="tenant_not_found")
            version = int(item.get("version", {}).get("N", "0"))
            data = {**_body(item), **changes}
            self._local_writes += 1
            try:
                async with self._calls():
                    await self._c.put_item(
                        TableName=self.tables.main,
                        Item=_item(TENANTS_PK, tenant_id, data, version=_n(version + 1)),
                        ConditionExpression="attribute_exists(pk) AND"
                                            " (attribute_not_exists(version) OR version = :v)",
                        ExpressionAttributeValues={":v": _n(version)})
            except ClientError:
                continue  # another admin write won the race: apply ours to the fresh item
            return tenant_from_row(data)
        raise Conflict(f"tenant {clip(tenant_id)!r} is being changed concurrently; try again",
                       code="concurrent_update")

    async def delete_tenant(self, tenant_id: str) -> bool:
        # The tenant goes first: a key whose tenant is gone no longer authenticates.
        existed = await self._delete(TENANTS_PK, tenant_id) is not None
        for item in await self._query(TENANT_PK_PREFIX + tenant_id, KEY_SK_PREFIX):
            await self._delete(item["pk"]["S"], item["sk"]["S"])
            await self._delete(KEYHASH_PK_PREFIX + item["key_hash"]["S"], KEYHASH_SK)
        return existed

    async def add_key(self, key: ApiKey) -> None:
        tenant_exists = {"ConditionCheck": {
            "TableName": self.tables.main, "ConditionExpression": "attribute_exists(pk)",
            "Key": {"pk": _s(TENANTS_PK), "sk": _s(key.tenant_id)},
        }}
        reasons = await self._transact([tenant_exists, *self._key_puts(key)])
        if reasons is None:
            return
        if reasons[0] == "ConditionalCheckFailed":
            raise NotFound(f"tenant {key.tenant_id!r} not found", code="tenant_not_found")
        if reasons[-1] == "ConditionalCheckFailed":
            raise Conflict("that API key is already in use", code="api_key_exists")
        raise Conflict(f"concurrent change, try again ({', '.join(reasons)})")

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        items = await self._query(TENANT_PK_PREFIX + tenant_id, KEY_SK_PREFIX)
        return [key_from_row(_body(i)) for i in items]

    async def delete_key(self, tenant_id: str, key_id: str) -> bool:
        old = await self._delete(TENANT_PK_PREFIX + tenant_id, KEY_SK_PREFIX + key_id)
        if old is None:
            return False
        await self._delete(KEYHASH_PK_PREFIX + old["key_hash"]["S"], KEYHASH_SK)
        return True

    async def find_key(self, key_hash: str) -> tuple[ApiKey, Tenant] | None:
        item = await self._get(KEYHASH_PK_PREFIX + key_hash, KEYHASH_SK)
        if item is None:
            return None
        key = key_from_row(_body(item))
        tenant = await self.get_tenant(key.tenant_id)
        return (key, tenant) if tenant is not None else None

    async def put_route(self, route: Route) -> bool:
        self._local_writes += 1
        async with self._calls():
            r = await self._c.put_item(TableName=self.tables.main,
                                       Item=_item(ROUTES_PK, route.name, route_to_row(route)),
                                       ReturnValues="ALL_OLD")
        return "Attributes" not in r

    async def get_route(self, name: str) -> Route | None:
        item = await self._get(ROUTES_PK, name)
        return route_from_row(_body(item)) if item else None

    async def list_routes(self) -> list[Route]:
        return [route_from_row(_body(i)) for i in await self._query(ROUTES_PK)]

    async def delete_route(self, name: str) -> bool:
        return await self._delete(ROUTES_PK, name) is not None

    async def write_usage(self, records: list[dict[str, Any]]) -> None:
        """BatchWriteItem, 25 items a call, a few calls in flight; unprocessed items are retried
        with backoff. Raises ServiceUnavailable if some could not be written (the writer keeps
        them spooled and tries again), RecordRejected if a record can never be written (the
        writer then finds which). A record's item key comes from the record, so writing
        it twice overwrites one item."""
        # One BatchWriteItem call may not name the same key twice.
        items = {r["request_id"]: _usage_item(r) for r in records}
        requests = [{"PutRequest": {"Item": item}} for item in items.values()]
        gate = asyncio.Semaphore(_BATCH_CONCURRENCY)

        async def write(chunk: list[dict[str, Any]]) -> None:
            async with gate:
                await self._batch_write(chunk)

        chunks = [requests[i:i + BATCH_WRITE_MAX]
                  for i in range(0, len(requests), BATCH_WRITE_MAX)]
        results = await asyncio.gather(*(write(c) for c in chunks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _batch_write(self, pending: list[dict[str, Any]]) -> None:
        table = self.tables.usage
        for attempt in range(_BATCH_ATTEMPTS):
            async with self._calls():
                try:
                    r = await self._c.batch_write_item(RequestItems={table: pending})
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    if code in _REJECTING:
                        raise RecordRejected(code) from None
                    raise
                except ParamValidationError:  # botocore's own check, before any call
                    raise RecordRejected("ParamValidationError") from None
            pending = r.get("UnprocessedItems", {}).get(table, [])
            if not pending:
                return
            await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt))  # throttled: back off
        raise ServiceUnavailable("DynamoDB kept throttling usage writes",
                                 code="store_unavailable", retryable=True)

    async def query_usage(
        self,
        tenant_id: str,
        start: float | None,
        end: float | None,
        model: str | None,
        limit: int,
        cursor: str | None,
    ) -> UsagePage:
        """One pass over the tenant's range: totals from every matching item, records from
        those after the cursor. [start, end): `end`'s bound sorts before `end#<request_id>`."""
        kwargs: dict[str, Any] = {
            "TableName": self.tables.usage,
            "KeyConditionExpression": "tenant_id = :t AND sk BETWEEN :a AND :b",
            "ExpressionAttributeValues": {
                ":t": _s(tenant_id),
                ":a": _s(time_bound(start) if start else "0"),
                ":b": _s(time_bound(end) if end is not None else "~"),
            },
        }
        if model:
            kwargs["FilterExpression"] = "model = :m"
            kwargs["ExpressionAttributeValues"][":m"] = _s(model)
        after = _decode_cursor(cursor) if cursor else None
        totals: dict[str, float] = {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                                    "cost": 0.0}
        page: list[dict[str, Any]] = []
        more = False
        async with self._calls():
            while True:
                r = await self._c.query(**kwargs)
                for item in r.get("Items", []):
                    totals["requests"] += 1
                    totals["input_tokens"] += int(item["input_tokens"]["N"])
                    totals["output_tokens"] += int(item["output_tokens"]["N"])
                    totals["cost"] += float(item["cost"]["N"])
                    if after is not None and item["sk"]["S"] <= after:
                        continue
                    if len(page) < limit:
                        page.append(item)
                    else:
                        more = True
                if "LastEvaluatedKey" not in r:
                    break
                kwargs["ExclusiveStartKey"] = r["LastEvaluatedKey"]
        return UsagePage(
            totals=totals,
            records=[_body(i) for i in page],
            next_cursor=_encode_cursor(page[-1]["sk"]["S"]) if more and page else None,
        )


    # Not admin writes: they leave `_local_writes` (the cache generation) alone.
    async def put_response_owner(self, owner: ResponseOwner) -> None:
        body = {"tenant_id": owner.tenant_id, "route": owner.route, "target": owner.target}
        item = _item(RESPONSE_PK_PREFIX + owner.response_id, RESPONSE_SK, body,
                     **{TTL_ATTRIBUTE: _n(int(owner.expires_at))})
        async with self._calls():
            await self._c.put_item(TableName=self.tables.main, Item=item)

    async def get_response_owner(self, response_id: str) -> ResponseOwner | None:
        item = await self._get(RESPONSE_PK_PREFIX + response_id, RESPONSE_SK)
        if item is None:
            return None
        expires_at = float(item[TTL_ATTRIBUTE]["N"])
        if expires_at <= time.time():  # DynamoDB's TTL deletes expired items late, if at all
            return None
        body = _body(item)
        return ResponseOwner(response_id, body["tenant_id"], body["route"], body["target"],
                             expires_at)

    async def delete_response_owner(self, response_id: str) -> None:
        async with self._calls():
            await self._c.delete_item(TableName=self.tables.main, Key={
                "pk": _s(RESPONSE_PK_PREFIX + response_id), "sk": _s(RESPONSE_SK)})


def _usage_item(r: dict[str, Any]) -> dict[str, Any]:
    """A record's item. A null cost (not a finite number) counts as 0 in totals; the body
    keeps the null."""
    check_record(r)
    try:
        body = orjson.dumps(r).decode()
    except TypeError:  # orjson.JSONEncodeError: a field outside the ones checked
        raise RecordRejected("unserializable") from None
    return {
        "tenant_id": _s(r["tenant_id"]),
        "sk": _s(usage_sort_key(float(r["started_at"]), r["request_id"])),
        "request_id": _s(r["request_id"]),
        "model": _s(str(r["model"])),
        "input_tokens": _n(int(r["input_tokens"])),
        "output_tokens": _n(int(r["output_tokens"])),
        "cost": _n(0.0 if r["cost"] is None else float(r["cost"])),
        "body": _s(body),
    }


def _encode_cursor(sk: str) -> str:
    return base64.urlsafe_b64encode(sk.encode()).decode()


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor.encode()).decode()
    except ValueError:
        raise InvalidRequest("invalid cursor", param="cursor") from None
