"""Retries, failover, circuit breakers and client disconnects, with real fake upstreams: a
primary that misbehaves on demand and a healthy backup, driven by the official openai SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    FakeUpstream,
    Gateway,
    fake_upstream_process,
    gateway_process,
    sdk_client,
    unique,
)
from tests.procs import free_port

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def primary() -> Iterator[FakeUpstream]:
    with fake_upstream_process() as fake:
        yield fake


@pytest.fixture
def pair(gateway: Gateway, primary: FakeUpstream, fresh_upstream: FakeUpstream
         ) -> tuple[openai.OpenAI, str, FakeUpstream, FakeUpstream]:
    primary.reset()
    model = unique("fo")
    gateway.put_model(model,
                      {"provider": "openai", "base_url": primary.openai_base, "model": "primary"},
                      {"provider": "openai", "base_url": fresh_upstream.openai_base,
                       "model": "backup"})
    key = gateway.create_tenant(unique("t"))["api_key"]
    client = sdk_client(openai.OpenAI, base_url=gateway.base_url, api_key=key, max_retries=0)
    return client, model, primary, fresh_upstream


def _models(fake: FakeUpstream) -> list[str]:
    return [r["body"]["model"] for r in fake.requests()]


def test_500_retried_then_failed_over(pair: tuple[openai.OpenAI, str, FakeUpstream,
                                                  FakeUpstream]) -> None:
    client, model, primary, backup = pair
    primary.faults({"kind": "status", "status": 500}, {"kind": "status", "status": 502})
    r = client.chat.completions.create(model=model, messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "word0 word1"
    assert _models(primary) == ["primary", "primary"]  # one retry on the primary
    assert _models(backup) == ["backup"]  # then the backup


def test_429_retry_after_is_honoured(pair: tuple[openai.OpenAI, str, FakeUpstream,
                                                 FakeUpstream]) -> None:
    client, model, primary, backup = pair
    primary.faults({"kind": "status", "status": 429, "retry_after": 1})
    t = time.monotonic()
    r = client.chat.completions.create(model=model, messages=MSG, max_tokens=1)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "word0"
    reqs = primary.requests()
    assert len(reqs) == 2 and reqs[1]["at"] - reqs[0]["at"] >= 0.95
    assert time.monotonic() - t >= 0.95
    assert _models(backup) == []


def test_400_is_not_retried(pair: tuple[openai.OpenAI, str, FakeUpstream,
                                        FakeUpstream]) -> None:
    client, model, primary, backup = pair
    primary.faults({"kind": "status", "status": 400})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MSG)  # type: ignore[arg-type]
    assert len(primary.requests()) == 1 and backup.requests() == []


def test_refused_and_hanging_primary(gateway: Gateway, primary: FakeUpstream,
                                     fresh_upstream: FakeUpstream) -> None:
    dead = unique("dead")
    gateway.put_model(dead,
                      {"provider": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                       "model": "primary"},
                      {"provider": "openai", "base_url": fresh_upstream.openai_base,
                       "model": "backup"})
    key = gateway.create_tenant(unique("t"))["api_key"]
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as client:
        r = client.chat.completions.create(model=dead, messages=MSG, max_tokens=1)  # type: ignore[arg-type]
        assert r.choices[0].message.content == "word0"

        primary.reset()
        hang = unique("hang")
        gateway.put_model(hang,
                          {"provider": "openai", "base_url": primary.openai_base,
                           "model": "primary"},
                          {"provider": "openai", "base_url": fresh_upstream.openai_base,
                           "model": "backup"})
        primary.faults({"kind": "hang"}, {"kind": "hang"})
        t = time.monotonic()
        stream = client.chat.completions.create(model=hang, messages=MSG, stream=True)  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.startswith("word0")
        # two first-byte timeouts (2 s each, the session gateway's setting), then the backup
        assert 3.9 <= time.monotonic() - t < 10
        assert "backup" in _models(fresh_upstream)


def test_drop_mid_stream_is_an_error_event_not_a_retry(
        pair: tuple[openai.OpenAI, str, FakeUpstream, FakeUpstream]) -> None:
    client, model, primary, backup = pair
    primary.faults({"kind": "drop_after", "chunks": 3})
    got: list[str] = []
    with pytest.raises(openai.APIError) as err:
        for c in client.chat.completions.create(model=model, messages=MSG, stream=True):  # type: ignore[arg-type]
            if c.choices and c.choices[0].delta.content:
                got.append(c.choices[0].delta.content)
    assert "closed the connection" in str(err.value.message)
    assert got == ["word0", " word1"]  # what arrived before the drop, nothing silently lost
    assert len(primary.requests()) == 1 and backup.requests() == []


def test_breaker_opens_then_probes_once(tmp_path: Path, primary: FakeUpstream,
                                        upstream: FakeUpstream) -> None:
    primary.reset()
    upstream.reset()
    with gateway_process(tmp_path, GATEWAY_WORKERS="1", GATEWAY_BREAKER_FAIL_MAX="3",
                         GATEWAY_BREAKER_RESET_S="2", GATEWAY_RETRIES_PER_TARGET="0") as gw:
        gw.put_model("m", {"provider": "openai", "base_url": primary.openai_base,
                           "model": "primary"},
                     {"provider": "openai", "base_url": upstream.openai_base, "model": "backup"})
        key = gw.create_tenant("t")["api_key"]
        primary.faults(*[{"kind": "status", "status": 503}] * 3)
        with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
            for _ in range(6):
                client.chat.completions.create(model="m", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            assert len(primary.requests()) == 3  # open after 3 failures: no more traffic
            assert len(upstream.requests()) == 6
            ready = httpx.get(f"{gw.url}/readyz").json()
            assert "open" in ready["circuit_breakers"].values()

            opened_at = time.monotonic()
            while time.monotonic() < opened_at + 1.2:  # during the 2 s cool-down, still none
                client.chat.completions.create(model="m", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            assert len(primary.requests()) == 3
            # after the cool-down, concurrent requests: exactly one probe reaches the primary
            primary.control("config", {"latency_ms": 300})
            time.sleep(max(0.0, opened_at + 2.2 - time.monotonic()))  # the cool-down itself
            threads = [threading.Thread(target=lambda: client.chat.completions.create(
                model="m", messages=MSG, max_tokens=1)) for _ in range(5)]  # type: ignore[arg-type]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert len(primary.requests()) == 4
            client.chat.completions.create(model="m", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            assert len(primary.requests()) == 5  # closed again after the successful probe


def test_client_disconnect_cancels_upstream(gateway: Gateway, fresh_upstream: FakeUpstream,
                                            pair: tuple[openai.OpenAI, str, FakeUpstream,
                                                        FakeUpstream]) -> None:
    _, model, primary, _ = pair
    primary.control("config", {"chunk_interval_ms": 200, "chunks": 50})
    key = gateway.create_tenant(unique("t"))["api_key"]
    body = {"model": model, "messages": MSG, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        for line in r.iter_lines():
            if "word2" in line:
                break
        closed_at = time.time()
    deadline = time.monotonic() + 3
    while not primary.events() and time.monotonic() < deadline:
        time.sleep(0.05)
    events = primary.events()
    assert events and events[0]["event"] == "client_disconnected"
    assert events[0]["at"] - closed_at < 1.0

    primary.reset()
    primary.faults({"kind": "hang"})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.base_url}/chat/completions", timeout=0.5,
                   json={"model": model, "messages": MSG},
                   headers={"Authorization": f"Bearer {key}"})
    closed_at = time.time()
    deadline = time.monotonic() + 3
    while not primary.events() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert primary.events() and primary.events()[0]["at"] - closed_at < 1.0
