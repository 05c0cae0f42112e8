"""Issue 12, the admin surface: the admin key can never be empty or printed, admin input is
validated with full matches and bounded prices, and no secret (URL credentials, a variable the
gateway reads, its data files) leaks to tenants, metrics, logs or other users of the machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llm_gateway.domain import Route, Target
from llm_gateway.settings import Settings, SettingsError, secret_from_env
from llm_gateway.store.embedded import EmbeddedStore

from tests.conftest import FakeUpstream, Gateway, gateway_env, gateway_process, unique

SECRET_ENV = "aws-secret-hunter4"


def _exit_code(env: dict[str, str], deadline_s: float = 30.0) -> tuple[int | None, str]:
    """Start `llm-gateway serve`; its exit code within the deadline (None: still running, then
    stopped) and what it wrote."""
    proc = subprocess.Popen([sys.executable, "-m", "llm_gateway", "serve"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=deadline_s)
        return proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose data dir it creates itself and whose admin key it generates; a secret
    in its environment that routes must never reach; request log lines on."""
    data_dir = tmp_path_factory.mktemp("private") / "data"
    with gateway_process(data_dir, ADMIN_API_KEY="", LOG_LEVEL="INFO",
                         AWS_SECRET_ACCESS_KEY=SECRET_ENV) as gw:
        key = (data_dir / "admin_api_key").read_text().strip()
        yield replace(gw, admin_key=key)


# --- Item 1: the admin key can never be empty ---------------------------------------------


@pytest.mark.parametrize("content", ["", "   \n\t\n", "sk-short-15char\n"])
def test_a_short_admin_key_file_refuses_to_start(tmp_path: Path, content: str) -> None:
    (tmp_path / "admin_api_key").write_text(content)
    code, out = _exit_code(gateway_env(tmp_path, 1, ADMIN_API_KEY=""))
    assert code == 2, out
    assert str(tmp_path / "admin_api_key") in out


def test_a_short_admin_key_variable_refuses_to_start(tmp_path: Path) -> None:
    code, out = _exit_code(gateway_env(tmp_path, 1, ADMIN_API_KEY="sk-short-15char"))
    assert code == 2, out
    assert "ADMIN_API_KEY" in out
    assert "sk-short-15char" not in out


def test_generated_admin_key_is_logged_by_path_never_printed(private: Gateway) -> None:
    path = private.data_dir / "admin_api_key"
    key = path.read_text().strip()
    assert len(key) >= 16
    assert _mode(path) == 0o600
    out = private.output()
    assert key not in out
    assert str(path) in out
    # written through a temporary file that is gone once the key is in place
    assert not [p for p in private.data_dir.iterdir() if "admin_api_key" in p.name
                and p.name != "admin_api_key"]
    r = httpx.get(f"{private.url}/admin/tenants", headers={"X-Admin-Key": key})
    assert r.status_code == 200
    assert httpx.get(f"{private.url}/admin/tenants").status_code == 401


def test_with_admin_key_checks_length(tmp_path: Path) -> None:
    for key in ("", "x" * 15):
        with pytest.raises(SettingsError, match="ADMIN_API_KEY"):
            Settings(data_dir=tmp_path, admin_api_key=key).with_admin_key()
    s, generated = Settings(data_dir=tmp_path / "new").with_admin_key()
    assert generated and s.admin_api_key and len(s.admin_api_key) >= 16
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["admin_api_key"]


# --- Item 5: secrets stay secret ----------------------------------------------------------


@pytest.mark.parametrize("base_url", [
    "http://user:pass@127.0.0.1:9/v1", "http://token@127.0.0.1:9/v1",
    "http://127.0.0.1:9/v1?api-key=s3cret", "http://127.0.0.1:9/v1?", "http://127.0.0.1:9/v1#k",
])
def test_base_url_with_credentials_gets_422(private: Gateway, base_url: str) -> None:
    with private.admin() as admin:
        r = admin.put(f"/admin/models/{unique('m')}", json={"targets": [
            {"provider": "openai", "base_url": base_url, "model": "m"}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "targets[0].base_url"


@pytest.mark.parametrize("name", [
    "ADMIN_API_KEY", "admin_api_key", "REDIS_ADDR", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "DYNAMODB_API_KEY", "GATEWAY_API_KEY", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_TOKEN", "HOME",
    "PATH", "OPENAI_API_KEY\n", "MY-API_KEY", "_API_KEY",
])
def test_api_key_env_must_name_a_provider_secret(private: Gateway, name: str) -> None:
    with private.admin() as admin:
        r = admin.put(f"/admin/models/{unique('m')}", json={"targets": [
            {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
             "api_key_env": name}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "targets[0].api_key_env"


def test_api_key_env_accepts_provider_secrets(private: Gateway) -> None:
    for name in ("OPENAI_API_KEY", "HF_TOKEN", "my_vllm_api_key"):
        private.put_model(unique("m"), {"provider": "openai", "base_url": "http://127.0.0.1:9/v1",
                                        "model": "m", "api_key_env": name})


def test_secret_from_env_refuses_the_gateways_own_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ADMIN_API_KEY", "AWS_SECRET_ACCESS_KEY", "GATEWAY_HOST", "REDIS_ADDR"):
        monkeypatch.setenv(name, "do-not-send")
        assert secret_from_env(name) is None
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fine")
    assert secret_from_env("OPENAI_API_KEY") == "sk-fine"


def test_target_name_never_carries_credentials() -> None:
    t = Target("openai", "https://alice:hunter2@api.example.com:8443/v1?key=hunter3#hunter5", "m")
    assert t.name == "openai:https://api.example.com:8443/v1#m"
    assert Target("openai", "https://api.example.com/v1", "m").name == \
        "openai:https://api.example.com/v1#m"


def _store_route(data_dir: Path, route: Route) -> None:
    """A route as a version before this fix could have stored it."""
    async def put() -> None:
        store = EmbeddedStore(data_dir)
        await store.start()
        try:
            await store.put_route(route)
        finally:
            await store.aclose()

    asyncio.run(put())


def _chat(gw: Gateway, key: str, model: str) -> None:
    # Whatever the answer: the record, the metrics and the log line are what is read.
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client, \
            contextlib.suppress(openai.APIStatusError):
        client.chat.completions.create(model=model, max_tokens=1,
                                       messages=[{"role": "user", "content": "x"}])


def _usage(gw: Gateway, tenant: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    with gw.admin() as admin:
        while True:
            data: list[dict[str, Any]] = admin.get(f"/admin/tenants/{tenant}/usage").json()["data"]
            if len(data) >= count or time.monotonic() > deadline:
                return data
            time.sleep(0.1)  # poll interval


def test_stored_credentials_reach_no_tenant_metric_log_or_readyz(
        private: Gateway, fresh_upstream: FakeUpstream) -> None:
    port = fresh_upstream.url.rsplit(":", 1)[1]
    userinfo, query, env = unique("ui"), unique("q"), unique("env")
    _store_route(private.data_dir, Route(userinfo, (Target(
        "openai", f"http://alice:hunter2@127.0.0.1:{port}/v1", "m"),)))
    _store_route(private.data_dir, Route(query, (Target(
        "openai", f"http://127.0.0.1:{port}/v1?token=hunter3", "m", api_key="sk-upstream-1"),)))
    _store_route(private.data_dir, Route(env, (Target(
        "openai", fresh_upstream.openai_base, "m", api_key_env="AWS_SECRET_ACCESS_KEY"),)))
    tenant = unique("t")
    key = private.create_tenant(tenant)["api_key"]
    for model in (userinfo, query, env):
        _chat(private, key, model)

    records = _usage(private, tenant, 3)
    assert len(records) == 3
    readyz = httpx.get(f"{private.url}/readyz")
    assert readyz.status_code == 200
    body = readyz.json()
    assert set(body) >= {"status", "circuit_breakers"} and body["circuit_breakers"]
    metrics = httpx.get(f"{private.url}/metrics").text
    seen = {"readyz": readyz.text, "metrics": metrics, "logs": private.output(),
            "usage": str(records)}
    for where, text in seen.items():
        for secret in ("hunter2", "alice", "hunter3"):
            assert secret not in text, (where, secret)
    # readyz names breakers by a label without any URL
    assert "http" not in readyz.text and "127.0.0.1" not in readyz.text
    assert all(label.startswith("openai#m@") for label in body["circuit_breakers"])
    # a variable the gateway reads is never sent upstream as a provider key
    sent = [r["headers"].get("authorization", "") for r in fresh_upstream.requests()]
    assert sent and not any(SECRET_ENV in h for h in sent)


def test_data_dir_and_files_are_private(private: Gateway) -> None:
    d = private.data_dir
    assert _mode(d) == 0o700
    names = ["gateway.sqlite3", "usage.sqlite3", "limiter.buckets", "admin_api_key"]
    names += [p.name for p in d.iterdir() if p.name.endswith(("-wal", "-shm"))]
    assert any(n.endswith("-wal") for n in names)
    for name in names:
        assert _mode(d / name) == 0o600, name


def test_files_of_an_older_gateway_are_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with gateway_process(data):
        pass
    for p in data.iterdir():
        if p.is_file():
            p.chmod(0o644)
    (data / "admin_api_key").write_text("sk-admin-an-older-key-0123\n")
    (data / "admin_api_key").chmod(0o644)
    with gateway_process(data, ADMIN_API_KEY=""):
        for name in ("gateway.sqlite3", "usage.sqlite3", "limiter.buckets", "admin_api_key"):
            assert _mode(data / name) == 0o600, name


@pytest.mark.parametrize("tenant_id", ["a\n", "a\x00", "\n"])
def test_tenant_ids_are_matched_in_full(private: Gateway, tenant_id: str) -> None:
    with private.admin() as admin:
        r = admin.post("/admin/tenants", json={"tenant_id": tenant_id})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "tenant_id"


@pytest.mark.parametrize("name", ["a%0A", "%00", "a%00b", "a%0D"])
def test_route_names_are_matched_in_full(private: Gateway, name: str) -> None:
    with private.admin() as admin:
        r = admin.put(f"/admin/models/{name}", json={"targets": [
            {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "name"


def test_ids_in_admin_paths_are_matched_in_full(private: Gateway) -> None:
    tenant = unique("t")
    key_id = private.create_tenant(tenant)["key_id"]
    with private.admin() as admin:
        assert admin.delete(f"/admin/tenants/{tenant}/keys/{key_id}%0A").status_code == 404
        assert admin.get(f"/admin/tenants/{tenant}%0A").status_code == 404
        assert admin.delete(f"/admin/tenants/{tenant}/keys/{key_id}").status_code == 200


# --- Item 4: prices are bounded -----------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("input_price_per_mtok", 1e308), ("output_price_per_mtok", 1_000_001),
    ("input_price_per_mtok", -0.5), ("output_price_per_mtok", True),
    ("input_price_per_mtok", "1"),
])
def test_prices_are_finite_and_bounded(private: Gateway, field: str, value: Any) -> None:
    with private.admin() as admin:
        r = admin.put(f"/admin/models/{unique('m')}", json={field: value, "targets": [
            {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field


def test_the_highest_price_is_accepted(private: Gateway) -> None:
    route = private.put_model(unique("m"), {"provider": "openai",
                                            "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                              input_price_per_mtok=1_000_000, output_price_per_mtok=0)
    assert route["input_price_per_mtok"] == 1_000_000
