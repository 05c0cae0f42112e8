"""Rows <-> domain values, shared by every store implementation."""

from __future__ import annotations

from typing import Any

from llm_gateway.domain import ApiKey, Route, Target, Tenant


def tenant_to_row(t: Tenant) -> dict[str, Any]:
    return {
        "tenant_id": t.tenant_id,
        "rpm_limit": t.rpm_limit,
        "tpm_limit": t.tpm_limit,
        "allowed_models": list(t.allowed_models),
        "enabled": t.enabled,
        "created_at": t.created_at,
    }


def tenant_from_row(r: dict[str, Any]) -> Tenant:
    return Tenant(
        tenant_id=str(r["tenant_id"]),
        rpm_limit=int(r["rpm_limit"]),
        tpm_limit=int(r["tpm_limit"]),
        allowed_models=tuple(r["allowed_models"]),
        enabled=bool(r["enabled"]),
        created_at=float(r["created_at"]),
    )


def key_to_row(k: ApiKey) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "tenant_id": k.tenant_id,
        "key_hash": k.key_hash,
        "prefix": k.prefix,
        "created_at": k.created_at,
    }


def key_from_row(r: dict[str, Any]) -> ApiKey:
    return ApiKey(
        key_id=str(r["key_id"]),
        tenant_id=str(r["tenant_id"]),
        key_hash=str(r["key_hash"]),
        prefix=str(r["prefix"]),
        created_at=float(r["created_at"]),
    )


def route_to_row(route: Route) -> dict[str, Any]:
    return {
        "name": route.name,
        "targets": [
            {k: v for k, v in _target_items(t) if v is not None} for t in route.targets
        ],
        "input_price_per_mtok": route.input_price_per_mtok,
        "output_price_per_mtok": route.output_price_per_mtok,
        "updated_at": route.updated_at,
    }


def _target_items(t: Target) -> list[tuple[str, Any]]:
    return [
        ("provider", t.provider),
        ("base_url", t.base_url),
        ("model", t.model),
        ("api_key", t.api_key),
        ("api_key_env", t.api_key_env),
        ("weight", t.weight),
    ]


def route_from_row(r: dict[str, Any]) -> Route:
    return Route(
        name=str(r["name"]),
        targets=tuple(
            Target(
                provider=str(t["provider"]),
                base_url=str(t["base_url"]),
                model=str(t["model"]),
                api_key=t.get("api_key"),
                api_key_env=t.get("api_key_env"),
                weight=int(t["weight"]) if t.get("weight") is not None else None,
            )
            for t in r["targets"]
        ),
        input_price_per_mtok=float(r.get("input_price_per_mtok") or 0.0),
        output_price_per_mtok=float(r.get("output_price_per_mtok") or 0.0),
        updated_at=float(r.get("updated_at") or 0.0),
    )
