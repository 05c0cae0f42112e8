"""Shared fixtures: real processes on free ports (fake upstream, gateway under Granian), and small
clients for the admin API. Every process is waited on through its health endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.procs import free_port, read_output, running

ADMIN_KEY = "sk-admin-test-0123456789"


@dataclass
class FakeUpstream:
    url: str  # http://127.0.0.1:port

    @property
    def openai_base(self) -> str:
        return f"{self.url}/v1"

    def control(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        with httpx.Client(base_url=self.url, timeout=5) as c:
            r = c.post(f"/_control/{path}", json=payload or {})
            r.raise_for_status()
            return r.json()

    def reset(self) -> None:
        self.control("reset")

    def faults(self, *faults: dict[str, Any]) -> None:
        self.control("faults", {"faults": list(faults)})

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/_control/requests", timeout=5).json()  # type: ignore[no-any-return]

    def events(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/_control/events", timeout=5).json()  # type: ignore[no-any-return]


@contextmanager
def fake_upstream_process(**flags: Any) -> Iterator[FakeUpstream]:
    port = free_port()
    cmd = [sys.executable, "-m", "llm_gateway.testing.fake_upstream", "--port", str(port)]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/_control/health"):
        yield FakeUpstream(url)


@dataclass
class Gateway:
    url: str
    data_dir: Path
    admin_key: str = ADMIN_KEY
    env: dict[str, str] = field(default_factory=dict)
    output_file: IO[bytes] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        """Everything the gateway's processes have written to stdout and stderr so far."""
        assert self.output_file is not None
        return read_output(self.output_file)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-Admin-Key": self.admin_key},
                            timeout=10)

    def create_tenant(self, tenant_id: str, **fields: Any) -> dict[str, Any]:
        with self.admin() as c:
            r = c.post("/admin/tenants", json={"tenant_id": tenant_id, **fields})
            assert r.status_code == 201, r.text
            return r.json()  # type: ignore[no-any-return]

    def put_model(self, name: str, *targets: dict[str, Any], **extra: Any) -> dict[str, Any]:
        with self.admin() as c:
            r = c.put(f"/admin/models/{name}", json={"targets": list(targets), **extra})
            assert r.status_code in (200, 201), r.text
            return r.json()  # type: ignore[no-any-return]


def gateway_env(data_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    env = {
        "SERVER_PORT": str(port),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_WORKERS": "2",
        "GATEWAY_DATA_DIR": str(data_dir),
        "ADMIN_API_KEY": ADMIN_KEY,
        "LOG_LEVEL": "WARNING",
        "GATEWAY_SHUTDOWN_GRACE_S": "10",
    }
    for name in ("REDIS_ADDR", "DYNAMODB_TABLE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        env.setdefault(name, "")
    env.update(overrides)
    return env


@contextmanager
def gateway_process(data_dir: Path, **env: str) -> Iterator[Gateway]:
    port = free_port()
    full_env = gateway_env(data_dir, port, **env)
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llm_gateway", "serve"]
    with tempfile.TemporaryFile() as out, \
            running(cmd, f"{url}/readyz", env=full_env, deadline_s=30, output=out) as proc:
        yield Gateway(url, data_dir, full_env["ADMIN_API_KEY"] or ADMIN_KEY, full_env, out, proc)


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with fake_upstream_process() as fake:
        yield fake


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A 2-worker gateway on the embedded store, shared by tests that only add their own
    tenants and models (unique names per test)."""
    with gateway_process(tmp_path_factory.mktemp("gw"), GATEWAY_FIRST_BYTE_TIMEOUT_S="2",
                         GATEWAY_STREAM_IDLE_TIMEOUT_S="2",
                         # a non-stream request waits for headers this long, not first-byte
                         GATEWAY_REQUEST_TIMEOUT_S="2") as gw:
        yield gw


@pytest.fixture
def fresh_upstream(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream


_sdk_clients: list[Any] = []


def sdk_client(cls: Any, **options: Any) -> Any:
    """An official SDK client (`openai.OpenAI`, `anthropic.Anthropic`, ...) closed when the test
    ends: one left to the garbage collector may warn of its unclosed socket at any later moment,
    and warnings are errors."""
    client = cls(**options)
    _sdk_clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while _sdk_clients:
        _sdk_clients.pop().close()


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


@dataclass
class RedisServer:
    port: int
    proc: Any = None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        import subprocess

        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()


@contextmanager
def redis_process() -> Iterator[RedisServer]:
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)  # poll interval
        yield RedisServer(port, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(5)


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    with redis_process() as server:
        yield server


@dataclass
class Moto:
    url: str
    port: int


@contextmanager
def moto_process() -> Iterator[Moto]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running(cmd, f"{url}/moto-api/", deadline_s=30):
        yield Moto(url, port)


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with moto_process() as server:
        yield server


def dynamodb_env(moto: Moto, table: str) -> dict[str, str]:
    return {"DYNAMODB_TABLE_NAME": table, "DYNAMODB_ENDPOINT_URL": moto.url,
            "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing"}
