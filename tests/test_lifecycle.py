"""The gateway as a process: restart persistence, the generated admin key, graceful SIGTERM with
a stream in flight, and configuration errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import FakeUpstream, fake_upstream_process, gateway_env, gateway_process
from tests.procs import free_port, running


def test_state_survives_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    with gateway_process(tmp_path) as gw:
        gw.put_model("persisted", {"provider": "openai", "base_url": upstream.openai_base,
                                   "model": "m"})
        key = gw.create_tenant("survivor")["api_key"]
    with gateway_process(tmp_path) as gw, openai.OpenAI(base_url=gw.base_url, api_key=key,
                                                        max_retries=0) as client:
        r = client.chat.completions.create(model="persisted", max_tokens=1,
                                           messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content == "word0"


def test_admin_key_generated_once(tmp_path: Path) -> None:
    port = free_port()
    env = gateway_env(tmp_path, port, ADMIN_API_KEY="")
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llm_gateway", "serve"]
    with running(cmd, f"{url}/healthz", env=env, deadline_s=30):
        stored = (tmp_path / "admin_api_key").read_text().strip()
        assert stored.startswith("sk-admin-")
        assert oct((tmp_path / "admin_api_key").stat().st_mode & 0o777) == "0o600"
        ok = httpx.get(f"{url}/admin/tenants", headers={"X-Admin-Key": stored})
        assert ok.status_code == 200
    with running(cmd, f"{url}/healthz", env=env, deadline_s=30):
        assert (tmp_path / "admin_api_key").read_text().strip() == stored


def test_sigterm_lets_a_stream_finish(tmp_path: Path) -> None:
    with fake_upstream_process(chunk_interval_ms=100, chunks=20) as slow:
        port = free_port()
        env = {**os.environ, **gateway_env(tmp_path, port)}
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "llm_gateway", "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            admin = {"X-Admin-Key": env["ADMIN_API_KEY"]}
            httpx.put(f"{url}/admin/models/slow", headers=admin, json={"targets": [
                {"provider": "openai", "base_url": slow.openai_base, "model": "m"}]})
            key = httpx.post(f"{url}/admin/tenants", headers=admin,
                             json={"tenant_id": "t"}).json()["api_key"]

            words: list[str] = []
            first_chunk = threading.Event()

            def consume() -> None:
                with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as c:
                    for chunk in c.chat.completions.create(
                            model="slow", stream=True,
                            messages=[{"role": "user", "content": "x"}]):
                        if chunk.choices and chunk.choices[0].delta.content:
                            words.append(chunk.choices[0].delta.content)
                            first_chunk.set()

            reader = threading.Thread(target=consume)
            reader.start()
            assert first_chunk.wait(10)
            proc.send_signal(signal.SIGTERM)
            reader.join(20)
            assert not reader.is_alive()
            assert "".join(words) == " ".join(f"word{i}" for i in range(20))
            assert proc.wait(20) == 0
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/healthz")
        finally:
            if proc.poll() is None:
                proc.kill()


def test_invalid_settings_exit_with_a_message(tmp_path: Path) -> None:
    env = {**os.environ, "SERVER_PORT": "http", "GATEWAY_DATA_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "llm_gateway", "serve"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "SERVER_PORT='http' is invalid" in r.stderr
    env = {**os.environ, "DYNAMODB_TABLE_NAME": "T", "ADMIN_API_KEY": "",
           "GATEWAY_DATA_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "llm_gateway", "serve"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "ADMIN_API_KEY is required" in r.stderr
