"""Every admin endpoint, through a real 2-worker gateway."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import FakeUpstream, Gateway, sdk_client, unique


def _client(gateway: Gateway, key: str) -> openai.OpenAI:
    return sdk_client(openai.OpenAI, base_url=gateway.base_url, api_key=key, max_retries=0)


def _route(gateway: Gateway, upstream: FakeUpstream) -> str:
    model = unique("m")
    gateway.put_model(model, {"provider": "openai", "base_url": upstream.openai_base,
                              "model": "fake"})
    return model


def _chat(client: openai.OpenAI, model: str) -> str | None:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=1)
    return r.choices[0].message.content


def test_tenant_lifecycle(gateway: Gateway, upstream: FakeUpstream) -> None:
    model = _route(gateway, upstream)
    tid = unique("vip")
    with gateway.admin() as admin:
        r = admin.post("/admin/tenants", json={
            "tenant_id": tid, "api_key": "sk-vip-123-" + tid, "rpm_limit": 1000,
            "tpm_limit": 500000, "allowed_models": ["*"]})
        assert r.status_code == 201
        created = r.json()
        assert created["api_key"] == "sk-vip-123-" + tid
        assert created["rpm_limit"] == 1000 and created["allowed_models"] == ["*"]

        assert admin.post("/admin/tenants", json={"tenant_id": tid}).status_code == 409

        listed = admin.get("/admin/tenants").json()["data"]
        assert tid in [t["tenant_id"] for t in listed]
        one = admin.get(f"/admin/tenants/{tid}").json()
        assert one["keys"][0]["key_id"] == created["key_id"]
        assert "api_key" not in one and "key_hash" not in str(one)

        patched = admin.patch(f"/admin/tenants/{tid}", json={"rpm_limit": 5,
                                                             "allowed_models": [model]})
        assert patched.status_code == 200
        assert patched.json()["rpm_limit"] == 5 and patched.json()["allowed_models"] == [model]

        with _client(gateway, created["api_key"]) as client:
            assert _chat(client, model) == "word0"
            # Suspending takes effect on every worker at once.
            assert admin.patch(f"/admin/tenants/{tid}", json={"enabled": False}).status_code == 200
            for _ in range(4):  # several requests: several connections, both workers
                with pytest.raises(openai.AuthenticationError):
                    _chat(client, model)
            admin.patch(f"/admin/tenants/{tid}", json={"enabled": True})
            assert _chat(client, model) == "word0"

        deleted = admin.delete(f"/admin/tenants/{tid}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        with _client(gateway, created["api_key"]) as client, pytest.raises(
            openai.AuthenticationError
        ):
            _chat(client, model)
        assert admin.get(f"/admin/tenants/{tid}").status_code == 404
        assert admin.delete(f"/admin/tenants/{tid}").status_code == 404


def test_generated_key_and_rotation(gateway: Gateway, upstream: FakeUpstream) -> None:
    model = _route(gateway, upstream)
    tid = unique("rot")
    first = gateway.create_tenant(tid)
    assert first["api_key"].startswith("sk-") and len(first["api_key"]) > 30
    with gateway.admin() as admin:
        r = admin.post(f"/admin/tenants/{tid}/keys")
        assert r.status_code == 201
        second = r.json()
        assert set(second) >= {"key_id", "api_key"} and second["api_key"] != first["api_key"]
        with _client(gateway, second["api_key"]) as c2, _client(gateway, first["api_key"]) as c1:
            assert _chat(c2, model) == "word0"
            assert _chat(c1, model) == "word0"
            r = admin.delete(f"/admin/tenants/{tid}/keys/{first['key_id']}")
            assert r.status_code == 200
            with pytest.raises(openai.AuthenticationError):
                _chat(c1, model)
            assert _chat(c2, model) == "word0"
        assert admin.delete(f"/admin/tenants/{tid}/keys/{first['key_id']}").status_code == 404
        assert admin.post("/admin/tenants/nobody-here/keys").status_code == 404


def test_models_admin(gateway: Gateway, upstream: FakeUpstream) -> None:
    name = unique("route")
    target = {"provider": "openai", "base_url": upstream.openai_base, "model": "x",
              "api_key": "sk-secret-never-shown"}
    with gateway.admin() as admin:
        r = admin.put(f"/admin/models/{name}", json={"targets": [target],
                                                     "input_price_per_mtok": 2.5})
        assert r.status_code == 201
        assert r.json()["targets"][0]["api_key_set"] is True
        r = admin.put(f"/admin/models/{name}", json={"targets": [target, {
            "provider": "anthropic", "base_url": "http://127.0.0.1:1", "model": "claude",
            "api_key_env": "ANTHROPIC_API_KEY", "weight": 2}]})
        assert r.status_code == 200
        listed = admin.get("/admin/models")
        assert "sk-secret-never-shown" not in listed.text
        mine = next(m for m in listed.json()["data"] if m["name"] == name)
        assert [t["provider"] for t in mine["targets"]] == ["openai", "anthropic"]
        assert admin.delete(f"/admin/models/{name}").status_code == 200
        assert admin.delete(f"/admin/models/{name}").status_code == 404


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/admin/tenants", {"tenant_id": ""}, "tenant_id"),
    ("/admin/tenants", {"tenant_id": "ok", "rpm_limit": -1}, "rpm_limit"),
    ("/admin/tenants", {"tenant_id": "ok", "tpm_limit": "lots"}, "tpm_limit"),
    ("/admin/tenants", {"tenant_id": "ok", "allowed_models": "gpt-4"}, "allowed_models"),
    ("/admin/tenants", {"tenant_id": "ok", "api_key": "short"}, "api_key"),
    ("/admin/tenants", {"tenant_id": "ok", "surprise": 1}, "surprise"),
])
def test_admin_invalid_bodies(gateway: Gateway, path: str, body: dict[str, object],
                              param: str) -> None:
    with gateway.admin() as admin:
        r = admin.post(path, json=body)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_admin_invalid_route_bodies(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        for body, param in [
            ({"targets": []}, "targets"),
            ({"targets": [{"provider": "azure", "base_url": "http://x", "model": "m"}]},
             "targets[0].provider"),
            ({"targets": [{"provider": "openai", "base_url": "ftp://x", "model": "m"}]},
             "targets[0].base_url"),
            ({"targets": [{"provider": "openai", "base_url": "http://x"}]}, "targets[0].model"),
        ]:
            r = admin.put("/admin/models/bad", json=body)
            assert r.status_code == 422, body
            assert r.json()["error"]["param"] == param
        r = admin.post("/admin/tenants", content=b"{not json",
                       headers={"content-type": "application/json"})
        assert r.status_code == 422


def test_admin_key_required(gateway: Gateway) -> None:
    import httpx

    for headers in ({}, {"X-Admin-Key": "wrong"}):
        r = httpx.get(f"{gateway.url}/admin/tenants", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
