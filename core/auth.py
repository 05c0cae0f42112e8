"""Tenant keys: how they are made, hashed and checked. Keys are stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from blacksheep import Request
from llm_gateway.catalog import Catalog
from llm_gateway.domain import ApiKey, Tenant
from llm_gateway.errors import AuthenticationFailed


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def make_key(tenant_id: str, api_key: str) -> ApiKey:
    return ApiKey(
        key_id="key_" + secrets.token_hex(8),
        tenant_id=tenant_id,
        key_hash=hash_key(api_key),
        prefix=api_key[:7],
        created_at=time.time(),
    )


def bearer_token(request: Request) -> str | None:
    value = request.get_first_header(b"authorization")
    if not value or len(value) < 8 or value[:7].lower() != b"bearer ":
        return None
    token = value[7:].strip()
    return token.decode("latin-1") if token else None


def api_key_header(request: Request) -> str | None:
    """The key of an Anthropic SDK (`x-api-key`), which the gateway accepts on every endpoint."""
    value = request.get_first_header(b"x-api-key")
    token = value.strip() if value else b""
    return token.decode("latin-1") if token else None


async def authenticate(catalog: Catalog, request: Request) -> tuple[ApiKey, Tenant]:
    token = bearer_token(request) or api_key_header(request)
    if token is None:
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            code="missing_api_key"
        )
    found = await catalog.principal(hash_key(token))
    if found is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    key, tenant = found
    if not tenant.enabled:
        raise AuthenticationFailed(
            "This API key's tenant is suspended.", code="tenant_suspended"
        )
    return key, tenant


def admin_key_matches(expected: str, request: Request) -> bool:
    given = request.get_first_header(b"x-admin-key") or b""
    return hmac.compare_digest(given, expected.encode())
