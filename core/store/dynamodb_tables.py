"""The DynamoDB table design: names, key schema, and the exact actions the gateway calls.

Two tables, both on-demand (PAY_PER_REQUEST), no GSI:

    main table  DYNAMODB_TABLE_NAME (e.g. LLMGateway_Tenants)      pk (S, HASH), sk (S, RANGE)
        pk = "TENANTS"            sk = <tenant_id>    a tenant (body JSON, version N)
        pk = "TENANT#<tenant_id>" sk = "KEY#<key_id>"  a tenant's key (body JSON, key_hash)
        pk = "KEYHASH#<sha256>"   sk = "KEYHASH"      key lookup by hash (body JSON of the key)
        pk = "ROUTES"             sk = <model name>   a model route (body JSON)
        pk = "RESPONSE#<id>"      sk = "RESPONSE"     who owns a relayed response (body JSON:
                                                       tenant_id, route, target; expires_at N,
                                                       the attribute to enable DynamoDB's TTL on)

    usage table DYNAMODB_USAGE_TABLE_NAME, default <main>_Usage   tenant_id (S, HASH), sk (S, RANGE)
        sk = "<started_at as %017.6f>#<request_id>"   one usage record (body JSON, model,
                                                       input_tokens, output_tokens, cost)

Access patterns: find a key by hash (GetItem KEYHASH, then GetItem the tenant), list tenants /
routes (Query one partition), a tenant's keys (Query its partition), a tenant's usage in a time
range (Query tenant_id with sk BETWEEN two timestamps; model filtered by FilterExpression).
A usage record's key is derived from the record itself, so writing it again overwrites the same
item: replays are idempotent by request_id without a conditional write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

USAGE_TABLE_SUFFIX = "_Usage"

# Item-type prefixes of the main table's partition keys.
TENANTS_PK = "TENANTS"
ROUTES_PK = "ROUTES"
TENANT_PK_PREFIX = "TENANT#"
KEY_SK_PREFIX = "KEY#"
KEYHASH_PK_PREFIX = "KEYHASH#"
KEYHASH_SK = "KEYHASH"
RESPONSE_PK_PREFIX = "RESPONSE#"
RESPONSE_SK = "RESPONSE"
# The attribute DynamoDB's TTL may be enabled on (epoch seconds); reads check the expiry anyway.
TTL_ATTRIBUTE = "expires_at"

# DynamoDB caps BatchWriteItem at 25 items (moto does not enforce it; we do).
BATCH_WRITE_MAX = 25

# Every DynamoDB action the gateway calls, for an IAM policy on both tables.
IAM_ACTIONS: tuple[str, ...] = (
    "dynamodb:DescribeTable",
    "dynamodb:CreateTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
    "dynamodb:BatchWriteItem",
    # TransactWriteItems (tenant creation, key rotation) is authorized by its items' actions:
    # PutItem and ConditionCheckItem. It is not an IAM action of its own.
    "dynamodb:ConditionCheckItem",
)
# What a gateway with GATEWAY_CREATE_TABLES=false calls (tables made by `init-dynamodb` or
# CloudFormation): DescribeTable and CreateTable are used only to create tables.
IAM_ACTIONS_RUNTIME: tuple[str, ...] = tuple(
    a for a in IAM_ACTIONS if a not in ("dynamodb:DescribeTable", "dynamodb:CreateTable")
)


@dataclass(frozen=True, slots=True)
class Tables:
    main: str
    usage: str

    @classmethod
    def named(cls, main: str, usage_override: str | None = None) -> Tables:
        return cls(main, usage_table_name(main, usage_override))


def usage_table_name(main_table: str, override: str | None = None) -> str:
    """The usage table's name: DYNAMODB_USAGE_TABLE_NAME, else `<main table>_Usage`."""
    return override or f"{main_table}{USAGE_TABLE_SUFFIX}"


def main_table_spec(name: str) -> dict[str, Any]:
    """CreateTable arguments for the main table."""
    return {
        "TableName": name,
        "AttributeDefinitions": [
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }


def usage_table_spec(name: str) -> dict[str, Any]:
    """CreateTable arguments for the usage table."""
    return {
        "TableName": name,
        "AttributeDefinitions": [
            {"AttributeName": "tenant_id", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "tenant_id", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }


def usage_sort_key(started_at: float, request_id: str) -> str:
    """Fixed-width so string order is time order (valid until the year 5138)."""
    return f"{started_at:017.6f}#{request_id}"


def time_bound(t: float) -> str:
    return f"{t:017.6f}"
