"""The usage ledger on the embedded default: one record per request that reached the limiter,
read back through the admin API."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FakeUpstream, Gateway, unique


def usage(gw: Gateway, tenant: str, **params: Any) -> dict[str, Any]:
    with gw.admin() as admin:
        r = admin.get(f"/admin/tenants/{tenant}/usage", params=params)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def wait_for(gw: Gateway, tenant: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        got = usage(gw, tenant)
        if got["totals"]["requests"] >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)  # poll interval while the writer drains


def test_one_record_per_request(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    model = unique("priced")
    gateway.put_model(model, {"provider": "openai", "base_url": fresh_upstream.openai_base,
                              "model": "m"}, input_price_per_mtok=500_000,
                      output_price_per_mtok=1_000_000)  # the highest price allowed
    tenant = unique("billed")
    key = gateway.create_tenant(tenant, rpm_limit=5)["api_key"]
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as client:
        for _ in range(3):
            client.chat.completions.create(model=model, max_tokens=3,
                                           messages=[{"role": "user", "content": "a b"}])
        for _ in range(2):
            list(client.chat.completions.create(model=model, max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": "a b"}]))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=model,
                                           messages=[{"role": "user", "content": "a b"}])
    got = wait_for(gateway, tenant, 6)
    # the fake counts 3 prompt tokens for "a b" (2 words + 1 per message)
    assert got["totals"] == {"requests": 6, "input_tokens": 5 * 3,
                             "output_tokens": 3 * 3 + 2 * 4,
                             "cost": pytest.approx(5 * 3 * 0.5 + 17 * 1.0)}
    records = got["data"]
    assert len({r["request_id"] for r in records}) == 6
    assert sorted(r["status"] for r in records) == [200] * 5 + [429]
    streamed = [r for r in records if r["stream"]]
    assert len(streamed) == 2 and all(r["ttft_ms"] is not None for r in streamed)
    for r in records:
        assert r["tenant_id"] == tenant and r["model"] == model
        assert set(r) >= {"request_id", "tenant_id", "key_id", "model", "provider", "target",
                          "input_tokens", "output_tokens", "cost", "status", "latency_ms",
                          "ttft_ms", "stream", "started_at"}
    page = usage(gateway, tenant, limit=4)
    assert len(page["data"]) == 4 and page["has_more"]
    rest = usage(gateway, tenant, limit=4, cursor=page["next_cursor"])
    assert len(rest["data"]) == 2 and not rest["has_more"]
    assert usage(gateway, tenant, model="other")["totals"]["requests"] == 0
    future = usage(gateway, tenant, **{"from": time.time() + 60})
    assert future["totals"]["requests"] == 0


def test_usage_of_unknown_tenant(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        assert admin.get("/admin/tenants/nobody/usage").status_code == 404
        assert httpx.get(f"{gateway.url}/admin/tenants/nobody/usage").status_code == 401
