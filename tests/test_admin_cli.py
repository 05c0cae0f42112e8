"""`llm-gateway admin`, run as a subprocess against a real gateway (the session `gateway`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llm_gateway.workers.admin_cli import build_parser

from tests.conftest import ADMIN_KEY, FakeUpstream, Gateway, unique
from tests.procs import free_port

_CLI_ENV = ("ADMIN_API_KEY", "SERVER_PORT", "GATEWAY_DATA_DIR")


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI with only `env` among the variables it reads; the admin key never shows."""
    base = {k: v for k, v in os.environ.items() if k not in _CLI_ENV}
    done = subprocess.run([sys.executable, "-m", "llm_gateway", "admin", *args],
                          env={**base, **env}, capture_output=True, text=True, timeout=30)
    assert ADMIN_KEY not in done.stdout + done.stderr
    return done


def admin(gw: Gateway, tmp_path: Path, *args: str) -> str:
    """A command that must succeed; the gateway found through SERVER_PORT (the default URL)."""
    port = gw.url.rsplit(":", 1)[1]
    done = run(*args, env={"ADMIN_API_KEY": gw.admin_key, "SERVER_PORT": port,
                           "GATEWAY_DATA_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def admin_json(gw: Gateway, tmp_path: Path, *args: str) -> Any:
    return json.loads(admin(gw, tmp_path, *args, "--json"))


def status_of(gw: Gateway, api_key: str) -> int:
    return httpx.get(f"{gw.base_url}/models", headers={"Authorization": f"Bearer {api_key}"},
                     timeout=10).status_code


def test_tenants_and_keys(gateway: Gateway, tmp_path: Path) -> None:
    tenant = unique("cli")
    out = admin(gateway, tmp_path, "tenants", "create", tenant, "--rpm", "10",
                "--models", "m1,m2")
    api_key = re.search(r"^api_key\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    assert status_of(gateway, api_key) == 200

    listed = admin(gateway, tmp_path, "tenants", "list")
    row = next(line for line in listed.splitlines() if line.startswith(tenant))
    assert row.split()[:5] == [tenant, "yes", "10", "unlimited", "m1,m2"]
    shown = admin_json(gateway, tmp_path, "tenants", "show", tenant)
    assert shown["rpm_limit"] == 10 and shown["allowed_models"] == ["m1", "m2"]
    assert len(shown["keys"]) == 1

    updated = admin_json(gateway, tmp_path, "tenants", "update", tenant, "--rpm", "none",
                         "--tpm", "5000", "--disable")
    assert (updated["rpm_limit"], updated["tpm_limit"], updated["enabled"]) == (None, 5000, False)
    assert status_of(gateway, api_key) == 401
    admin(gateway, tmp_path, "tenants", "update", tenant, "--enable")
    assert status_of(gateway, api_key) == 200

    second = admin_json(gateway, tmp_path, "keys", "create", tenant)
    assert status_of(gateway, second["api_key"]) == 200
    assert "revoked" in admin(gateway, tmp_path, "keys", "revoke", tenant, second["key_id"])
    assert status_of(gateway, second["api_key"]) == 401
    assert status_of(gateway, api_key) == 200

    admin(gateway, tmp_path, "tenants", "delete", tenant)
    assert status_of(gateway, api_key) == 401
    gone = run("tenants", "show", tenant, "--url", gateway.url, "--admin-key", gateway.admin_key,
               env={})
    assert gone.returncode == 1
    assert gone.stderr.startswith("error: 404 tenant_not_found: ")


def test_model_routes(gateway: Gateway, tmp_path: Path) -> None:
    name = unique("org/cli-model")  # a `/` in the name travels as one path segment
    put = admin_json(
        gateway, tmp_path, "models", "put", name,
        "--target", "provider=openai,base_url=https://api.openai.com/v1,model=gpt-4o,"
                    "api_key_env=OPENAI_API_KEY",
        "--target", "provider=self-hosted,base_url=http://10.0.0.5:8000/v1,model=llama,weight=2",
        "--input-price", "2.5", "--output-price", "10")
    assert put["name"] == name
    assert [(t["provider"], t["model"], t["weight"]) for t in put["targets"]] == [
        ("openai", "gpt-4o", None), ("self-hosted", "llama", 2)]
    assert (put["input_price_per_mtok"], put["output_price_per_mtok"]) == (2.5, 10.0)

    listed = admin(gateway, tmp_path, "models", "list").splitlines()
    first = next(i for i, line in enumerate(listed) if line.startswith(name))
    assert listed[first].split()[1:4] == ["1", "openai", "gpt-4o"]
    assert "$OPENAI_API_KEY" in listed[first] and "2.5" in listed[first]
    assert listed[first + 1].split()[:3] == ["2", "self-hosted", "llama"]

    route = tmp_path / "route.json"
    route.write_text(json.dumps({"targets": [{"provider": "anthropic", "model": "claude",
                                              "base_url": "https://api.anthropic.com"}]}))
    again = admin_json(gateway, tmp_path, "models", "put", name, "--file", str(route))
    assert [t["provider"] for t in again["targets"]] == ["anthropic"]
    assert again["input_price_per_mtok"] == 0

    admin(gateway, tmp_path, "models", "delete", name)
    names = [r["name"] for r in admin_json(gateway, tmp_path, "models", "list")["data"]]
    assert name not in names
    twice = run("models", "delete", name, "--url", gateway.url,
                env={"ADMIN_API_KEY": gateway.admin_key})
    assert twice.returncode == 1
    assert twice.stderr.startswith("error: 404 model_not_found: ")


def test_usage_table(gateway: Gateway, upstream: FakeUpstream, tmp_path: Path) -> None:
    model, tenant = unique("cli-usage"), unique("cli-usage")
    admin(gateway, tmp_path, "models", "put", model, "--target",
          f"provider=openai,base_url={upstream.openai_base},model=gpt-4o-mini",
          "--input-price", "500000", "--output-price", "1000000")
    key = admin_json(gateway, tmp_path, "tenants", "create", tenant)["api_key"]
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as client:
        for n in (3, 4):
            client.chat.completions.create(model=model, max_tokens=n,
                                           messages=[{"role": "user", "content": "a b"}])
    deadline = time.monotonic() + 15
    while (data := admin_json(gateway, tmp_path, "usage", tenant))["totals"]["requests"] < 2:
        assert time.monotonic() < deadline, "the usage records never reached the ledger"
        time.sleep(0.1)  # poll interval while the writer drains
    # the fake counts 3 prompt tokens for "a b" and answers max_tokens words
    assert data["totals"] == {"requests": 2, "input_tokens": 6, "output_tokens": 7,
                              "cost": pytest.approx(6 * 0.5 + 7 * 1.0)}

    lines = admin(gateway, tmp_path, "usage", tenant).splitlines()
    assert lines[0] == f"tenant {tenant}: totals"
    assert lines[1].split() == ["REQUESTS", "INPUT_TOKENS", "OUTPUT_TOKENS", "COST_$"]
    assert lines[2].split() == ["2", "6", "7", "10"]
    assert lines[1].index("COST_$") + len("COST_$") == len(lines[2])  # right-aligned numbers
    records = lines[lines.index("records:") + 1:]
    assert len(records) == 3 and records[0].split()[:4] == ["STARTED", "MODEL", "PROVIDER",
                                                            "STATUS"]
    ids = {r["request_id"] for r in data["data"]}
    column = records[0].index("REQUEST_ID")
    assert {line[column:] for line in records[1:]} == ids  # one aligned column
    for line in records[1:]:
        assert line.split()[1:4] == [model, "openai", "200"]

    page = admin(gateway, tmp_path, "usage", tenant, "--limit", "1", "--model", model)
    assert sum(rid in page for rid in ids) == 1
    assert "\nmore: --cursor " in page
    later = admin_json(gateway, tmp_path, "usage", tenant, "--from", "2999-01-01T00:00:00Z")
    assert later["totals"]["requests"] == 0


def test_wrong_admin_key(gateway: Gateway) -> None:
    done = run("tenants", "list", "--url", gateway.url, "--admin-key", "sk-admin-wrong",
               env={"ADMIN_API_KEY": gateway.admin_key})  # the flag wins over the environment
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("error: 401 invalid_admin_key: Invalid or missing X-Admin-Key.\n")
    assert "sk-admin-wrong" not in done.stderr


def test_gateway_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = run("tenants", "list", "--url", url, env={"ADMIN_API_KEY": "sk-admin-anything"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"error: cannot connect to the gateway at {url}"
                           " (is it running? pass --url or set SERVER_PORT)\n")


def test_admin_key_from_the_data_dir(gateway: Gateway, tmp_path: Path) -> None:
    port = gateway.url.rsplit(":", 1)[1]
    env = {"SERVER_PORT": port, "GATEWAY_DATA_DIR": str(tmp_path)}
    missing = run("tenants", "list", env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: no admin key: ")
    (tmp_path / "admin_api_key").write_text(gateway.admin_key + "\n")
    done = run("tenants", "list", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["object"] == "list"
    # the environment wins over the file
    wrong = run("tenants", "list", env={**env, "ADMIN_API_KEY": "sk-admin-not-this-one"})
    assert wrong.returncode == 1 and "invalid_admin_key" in wrong.stderr


@pytest.mark.parametrize("args", [
    ["tenants", "update", "t", "--rpm", "0"],
    ["tenants", "update", "t", "--enable", "--disable"],
    ["models", "put", "m"],
    ["models", "put", "m", "--target", "provider"],
    ["usage"],
    ["nothing"],
])
def test_bad_usage_exits_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(args)
    assert exc.value.code == 2


COMMANDS = [["tenants", a] for a in ("create", "list", "show", "update", "delete")] + [
    ["keys", "create"], ["keys", "revoke"], ["models", "put"], ["models", "list"],
    ["models", "delete"], ["usage"]]


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: llm-gateway admin {' '.join(command)}")
        assert "--json" in out and "--url" in out
