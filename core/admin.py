"""The admin API: tenants, their keys, and model routes. Every body is checked here; a bad one
gets 422 with the offending field in `param`."""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from blacksheep import Content, Request, Response
from llm_gateway.auth import admin_key_matches, make_key, new_api_key
from llm_gateway.chat_request import parse_json_object, read_body
from llm_gateway.domain import ApiKey, Route, Target, Tenant
from llm_gateway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    Unprocessable,
    clip,
)
from llm_gateway.http import route_value
from llm_gateway.providers import PROVIDERS
from llm_gateway.services import Services
from llm_gateway.settings import ADMIN_KEY_MIN_CHARS, provider_secret_name_allowed

# Matched in full (`fullmatch`): `$` would accept a trailing newline.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_MODEL = re.compile(r"[^\s/\x00-\x1f\x7f][^\s\x00-\x1f\x7f]{0,255}")
# Prices are per million tokens; a bound keeps every cost finite (1e308 made it inf).
MAX_PRICE_PER_MTOK = 1_000_000
_ADMIN_MAX_BODY = 1024 * 1024


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, None, Content(b"application/json", orjson.dumps(data)))


def require_admin(svc: Services, request: Request) -> None:
    expected = svc.settings.admin_api_key
    # Start-up refuses short keys; this holds even for an app built without that check.
    if not expected or len(expected) < ADMIN_KEY_MIN_CHARS \
            or not admin_key_matches(expected, request):
        raise AuthenticationFailed("Invalid or missing X-Admin-Key.", code="invalid_admin_key")


async def _body(svc: Services, request: Request) -> dict[str, Any]:
    raw = await read_body(request, _ADMIN_MAX_BODY, svc.settings.body_read_timeout_s)
    try:
        return parse_json_object(raw, svc.settings.max_json_depth)
    except InvalidRequest as exc:
        raise Unprocessable(exc.message) from None


def tenant_view(t: Tenant, keys: list[ApiKey] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "tenant_id": t.tenant_id,
        "rpm_limit": t.rpm_limit or None,
        "tpm_limit": t.tpm_limit or None,
        "allowed_models": list(t.allowed_models),
        "enabled": t.enabled,
        "created_at": t.created_at,
    }
    if keys is not None:
        view["keys"] = [
            {"key_id": k.key_id, "prefix": k.prefix, "created_at": k.created_at} for k in keys
        ]
    return view


def route_view(r: Route) -> dict[str, Any]:
    return {
        "name": r.name,
        "targets": [
            {
                "provider": t.provider,
                "base_url": t.base_url,
                "model": t.model,
                "api_key_set": bool(t.api_key),
                "api_key_env": t.api_key_env,
                "weight": t.weight,
            }
            for t in r.targets
        ],
        "input_price_per_mtok": r.input_price_per_mtok,
        "output_price_per_mtok": r.output_price_per_mtok,
        "updated_at": r.updated_at,
    }


def _field(message: str, param: str) -> Unprocessable:
    return Unprocessable(message, param=param)


def _limit(body: dict[str, Any], name: str, default: int) -> int:
    """A limit: a positive whole number, or null/absent for unlimited (kept as 0)."""
    if name not in body:
        return default
    v = body[name]
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _field(f"'{name}' must be a positive integer, or null for no limit", name)
    return v


def _models(body: dict[str, Any], default: tuple[str, ...]) -> tuple[str, ...]:
    if "allowed_models" not in body:
        return default
    v = body["allowed_models"]
    if not isinstance(v, list) or not all(
            isinstance(m, str) and _MODEL.fullmatch(m) for m in v):
        raise _field("'allowed_models' must be an array of model names (or [\"*\"])",
                     "allowed_models")
    return tuple(v)


def _check_api_key(v: Any) -> str:
    if (not isinstance(v, str) or not 8 <= len(v) <= 256 or not v.isascii()
            or not v.isprintable() or " " in v):
        raise _field("'api_key' must be 8 to 256 ASCII characters without spaces", "api_key")
    return v


async def create_tenant(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    body = await _body(svc, request)
    tenant_id = body.get("tenant_id")
    if not isinstance(tenant_id, str) or not _ID.fullmatch(tenant_id):
        raise _field("'tenant_id' must be 1-128 characters of letters, digits and _ . : @ -",
                     "tenant_id")
    api_key = _check_api_key(body["api_key"]) if body.get("api_key") is not None else None
    unknown = set(body) - {"tenant_id", "api_key", "rpm_limit", "tpm_limit", "allowed_models",
                           "enabled"}
    if unknown:
        raise _field(f"unknown field(s): {clip(', '.join(sorted(unknown)))}",
                     clip(sorted(unknown)[0]))
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _field("'enabled' must be a boolean", "enabled")
    tenant = Tenant(
        tenant_id=tenant_id,
        rpm_limit=_limit(body, "rpm_limit", 0),
        tpm_limit=_limit(body, "tpm_limit", 0),
        allowed_models=_models(body, ("*",)),
        enabled=enabled,
        created_at=time.time(),
    )
    api_key = api_key or new_api_key()
    key = make_key(tenant_id, api_key)
    await svc.store.create_tenant(tenant, key)
    return json_response({**tenant_view(tenant), "key_id": key.key_id, "api_key": api_key}, 201)


async def list_tenants(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    tenants = await svc.store.list_tenants()
    return json_response({"object": "list", "data": [tenant_view(t) for t in tenants]})


async def _tenant_or_404(svc: Services, tenant_id: str) -> Tenant:
    tenant = await svc.store.get_tenant(tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {clip(tenant_id)!r} not found", code="tenant_not_found",
                       param="tenant_id")
    return tenant


async def get_tenant(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    tenant = await _tenant_or_404(svc, route_value(request, "tenant_id"))
    keys = await svc.store.list_keys(tenant.tenant_id)
    return json_response(tenant_view(tenant, keys))


async def patch_tenant(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    tenant_id = route_value(request, "tenant_id")
    body = await _body(svc, request)
    allowed = {"rpm_limit", "tpm_limit", "allowed_models", "enabled"}
    unknown = set(body) - allowed
    if unknown:
        raise _field(f"field(s) that cannot be changed: {clip(', '.join(sorted(unknown)))}",
                     clip(sorted(unknown)[0]))
    if not body:
        raise _field(f"nothing to change: send any of {', '.join(sorted(allowed))}", "body")
    changes: dict[str, Any] = {}
    for name in ("rpm_limit", "tpm_limit"):
        if name in body:
            changes[name] = _limit(body, name, 0)
    if "allowed_models" in body:
        changes["allowed_models"] = list(_models(body, ()))
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise _field("'enabled' must be a boolean", "enabled")
        changes["enabled"] = body["enabled"]
    tenant = await svc.store.update_tenant(tenant_id, changes)
    return json_response(tenant_view(tenant))


async def delete_tenant(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    tenant_id = route_value(request, "tenant_id")
    if not await svc.store.delete_tenant(tenant_id):
        raise NotFound(f"tenant {clip(tenant_id)!r} not found", code="tenant_not_found",
                       param="tenant_id")
    return json_response({"tenant_id": tenant_id, "deleted": True})


async def create_key(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    tenant = await _tenant_or_404(svc, route_value(request, "tenant_id"))
    raw = await read_body(request, _ADMIN_MAX_BODY, svc.settings.body_read_timeout_s)
    body = await _body_from(svc, raw)
    api_key = _check_api_key(body["api_key"]) if body.get("api_key") is not None else new_api_key()
    key = make_key(tenant.tenant_id, api_key)
    await svc.store.add_key(key)
    return json_response(
        {"key_id": key.key_id, "api_key": api_key, "tenant_id": tenant.tenant_id}, 201
    )


async def _body_from(svc: Services, raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        return parse_json_object(raw, svc.settings.max_json_depth)
    except InvalidRequest as exc:
        raise Unprocessable(exc.message) from None


async def delete_key(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    tenant_id = route_value(request, "tenant_id")
    key_id = route_value(request, "key_id")
    if not await svc.store.delete_key(tenant_id, key_id):
        raise NotFound(f"key {clip(key_id)!r} not found for tenant {clip(tenant_id)!r}",
                       code="key_not_found", param="key_id")
    return json_response({"key_id": key_id, "deleted": True})


def _target(i: int, t: Any) -> Target:
    p = f"targets[{i}]"
    if not isinstance(t, dict):
        raise _field(f"{p} must be an object", p)
    provider = t.get("provider")
    if provider not in PROVIDERS:
        raise _field(f"{p}.provider must be one of {', '.join(PROVIDERS)}", f"{p}.provider")
    base_url = _base_url(t.get("base_url"), p)
    model = t.get("model")
    if not isinstance(model, str) or not model:
        raise _field(f"{p}.model must be a non-empty string", f"{p}.model")
    api_key, api_key_env = t.get("api_key"), t.get("api_key_env")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise _field(f"{p}.api_key must be a non-empty string", f"{p}.api_key")
    if api_key_env is not None and (not isinstance(api_key_env, str)
                                    or not provider_secret_name_allowed(api_key_env)):
        raise _field(f"{p}.api_key_env must name an environment variable ending in _API_KEY or "
                     "_TOKEN, and not one the gateway reads itself (ADMIN_API_KEY, REDIS_*, "
                     "AWS_*, DYNAMODB_*, GATEWAY_*, OTEL_*)", f"{p}.api_key_env")
    if api_key is not None and api_key_env is not None:
        raise _field(f"{p}: give api_key or api_key_env, not both", f"{p}.api_key")
    weight = t.get("weight")
    if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool)
                               or weight < 1):
        raise _field(f"{p}.weight must be a positive integer", f"{p}.weight")
    unknown = set(t) - {"provider", "base_url", "model", "api_key", "api_key_env", "weight"}
    if unknown:
        raise _field(f"{p}: unknown field(s) {clip(', '.join(sorted(unknown)))}", p)
    return Target(provider, base_url, model, api_key, api_key_env, weight)


def _base_url(v: Any, p: str) -> str:
    """An http(s) URL with a host and nothing that carries credentials: a URL is shown in the
    admin API and, without them, in metrics and logs; keys belong in api_key or api_key_env."""
    try:
        parsed = urlsplit(v) if isinstance(v, str) else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _field(f"{p}.base_url must be an http(s) URL", f"{p}.base_url")
    if "@" in parsed.netloc or "?" in v or "#" in v:
        raise _field(f"{p}.base_url must not carry credentials, a query or a fragment: give "
                     "the key in api_key or api_key_env", f"{p}.base_url")
    return v.rstrip("/")


def _price(body: dict[str, Any], name: str) -> float:
    v = body.get(name, 0.0)
    if v is None:
        return 0.0
    # The range first: math.isfinite would overflow on a huge int.
    if (not isinstance(v, int | float) or isinstance(v, bool)
            or not 0 <= v <= MAX_PRICE_PER_MTOK or not math.isfinite(v)):
        raise _field(f"'{name}' must be a number from 0 to {MAX_PRICE_PER_MTOK:,} "
                     "(per million tokens)", name)
    return float(v)


async def put_model(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    name = route_value(request, "name")
    if not _MODEL.fullmatch(name):
        raise _field("the model name must be 1-256 characters without spaces", "name")
    body = await _body(svc, request)
    targets = body.get("targets")
    if not isinstance(targets, list) or not targets:
        raise _field("'targets' must be a non-empty array", "targets")
    unknown = set(body) - {"targets", "input_price_per_mtok", "output_price_per_mtok"}
    if unknown:
        raise _field(f"unknown field(s): {clip(', '.join(sorted(unknown)))}",
                     clip(sorted(unknown)[0]))
    route = Route(
        name=name,
        targets=tuple(_target(i, t) for i, t in enumerate(targets)),
        input_price_per_mtok=_price(body, "input_price_per_mtok"),
        output_price_per_mtok=_price(body, "output_price_per_mtok"),
        updated_at=time.time(),
    )
    created = await svc.store.put_route(route)
    return json_response(route_view(route), 201 if created else 200)


async def list_models(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    routes = await svc.store.list_routes()
    return json_response({"object": "list", "data": [route_view(r) for r in routes]})


async def delete_model(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    name = route_value(request, "name")
    if not await svc.store.delete_route(name):
        raise NotFound(f"model {clip(name)!r} not found", code="model_not_found", param="name")
    return json_response({"name": name, "deleted": True})


async def tenant_usage(svc: Services, request: Request) -> Response:
    require_admin(svc, request)
    tenant_id = route_value(request, "tenant_id")
    await _tenant_or_404(svc, tenant_id)
    q = request.query
    try:
        start = _time_param(q, "from")
        end = _time_param(q, "to")
        limit = int(q.get("limit", ["100"])[0])
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("'limit' must be from 1 to 1000", param="limit")
    model = q.get("model", [None])[0]
    cursor = q.get("cursor", [None])[0]
    page = await svc.store.query_usage(tenant_id, start, end, model, limit, cursor)
    return json_response({
        "object": "usage",
        "tenant_id": tenant_id,
        "totals": page.totals,
        "data": page.records,
        "next_cursor": page.next_cursor,
        "has_more": page.next_cursor is not None,
    })


def _time_param(q: dict[str, list[str]], name: str) -> float | None:
    """Unix seconds or an ISO 8601 timestamp."""
    if name not in q:
        return None
    value = q[name][0]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'{name}' must be unix seconds or an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()

