"""What the official SDKs do that the gateway must tolerate: organization and project headers
(never forwarded), `x-stainless-*` headers (harmless), gzip and deflate bodies (the size limit on
the decoded bytes, a bomb refused without being inflated), and unknown paths and methods in
OpenAI's shape, or Anthropic's on /v1/messages*."""

from __future__ import annotations

import gzip
import time
import zlib
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from anthropic.types.shared import ErrorResponse

from tests.conftest import FakeUpstream, Gateway, sdk_client, unique

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MESSAGES = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SDK_HEADERS = ("openai-organization", "openai-project", "x-stainless")


@pytest.fixture
def routes(gateway: Gateway, fresh_upstream: FakeUpstream) -> tuple[str, str, str]:
    """(an openai route, an anthropic route, a tenant key)."""
    gpt, claude = unique("gpt"), unique("claude")
    gateway.put_model(gpt, {"provider": "openai", "base_url": fresh_upstream.openai_base,
                            "model": "up"})
    gateway.put_model(claude, {"provider": "anthropic", "base_url": fresh_upstream.url,
                               "model": "fake-claude", "api_key": "sk-ant"})
    return gpt, claude, gateway.create_tenant(unique("t"))["api_key"]


def _no_sdk_headers(upstream: FakeUpstream) -> None:
    for sent in upstream.requests():
        assert not [h for h in sent["headers"] if h.startswith(SDK_HEADERS)], sent["headers"]


def test_organization_project_and_stainless_headers_stay_here(
        gateway: Gateway, fresh_upstream: FakeUpstream, routes: tuple[str, str, str]) -> None:
    gpt, claude, key = routes
    client = sdk_client(openai.OpenAI, base_url=gateway.base_url, api_key=key,
                        organization="org-secret", project="proj-secret", max_retries=0)
    client.chat.completions.create(model=gpt, **CHAT)  # type: ignore[arg-type]
    client.chat.completions.create(model=claude, **CHAT)  # type: ignore[arg-type]
    client.embeddings.create(model=gpt, input="hi")
    ant = sdk_client(anthropic.Anthropic, base_url=gateway.url, api_key=key, max_retries=0,
                     default_headers={"OpenAI-Organization": "org-secret"})
    ant.messages.create(model=claude, **MESSAGES)  # type: ignore[arg-type]
    ant.messages.create(model=gpt, **MESSAGES)  # type: ignore[arg-type]
    paths = [r["path"] for r in fresh_upstream.requests()]
    assert paths == ["/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/messages",
                     "/v1/chat/completions"]
    _no_sdk_headers(fresh_upstream)


def _post(gateway: Gateway, path: str, body: bytes, key: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", content=body, timeout=30, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers})


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_bodies_on_every_endpoint(gateway: Gateway, fresh_upstream: FakeUpstream,
                                             routes: tuple[str, str, str], coding: str) -> None:
    gpt, claude, key = routes
    pack = gzip.compress if coding == "gzip" else zlib.compress
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"model": gpt, **CHAT}),
        ("/v1/messages", {"model": claude, **MESSAGES}),
        ("/v1/messages/count_tokens", {"model": gpt, "messages": MESSAGES["messages"]}),
        ("/v1/embeddings", {"model": gpt, "input": "hi"}),
    ]
    for path, body in cases:
        r = _post(gateway, path, pack(orjson.dumps(body)), key, **{"Content-Encoding": coding})
        assert r.status_code == 200, (path, r.text)
    assert [s["body"]["model"] for s in fresh_upstream.requests()] == ["up", "fake-claude", "up"]


def test_a_gzip_bomb_is_refused_without_being_inflated(
        gateway: Gateway, routes: tuple[str, str, str]) -> None:
    gpt, _, key = routes
    padding = b" " * (64 << 20)  # 64 MiB of JSON whitespace: ~64 KiB compressed
    bomb = gzip.compress(orjson.dumps({"model": gpt, **CHAT})[:-1] + b"," + padding + b'"x":1}')
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    r = _post(gateway, "/v1/chat/completions", bomb, key, **{"Content-Encoding": "gzip"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert "decoded" in r.json()["error"]["message"]
    assert time.perf_counter() - t0 < 5
    r = _post(gateway, "/v1/messages", bomb, key, **{"Content-Encoding": "gzip"})
    assert r.status_code == 413
    assert ErrorResponse.model_validate(r.json()).error.type == "invalid_request_error"


def test_bad_and_unknown_encodings_are_400(gateway: Gateway,
                                            routes: tuple[str, str, str]) -> None:
    gpt, _, key = routes
    body = orjson.dumps({"model": gpt, **CHAT})
    r = _post(gateway, "/v1/chat/completions", b"\x1f\x8bnot gzip", key,
              **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding"
    r = _post(gateway, "/v1/chat/completions", gzip.compress(body)[:-8], key,
              **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding"
    r = _post(gateway, "/v1/chat/completions", body, key, **{"Content-Encoding": "br"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_encoding"
    r = _post(gateway, "/v1/messages", b"garbage", key, **{"Content-Encoding": "deflate"})
    assert r.status_code == 400
    assert ErrorResponse.model_validate(r.json()).error.type == "invalid_request_error"


def test_unknown_paths_and_methods(gateway: Gateway) -> None:
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/embeddings", 405)]:
        r = httpx.request(method, f"{gateway.url}{path}", timeout=10)
        assert r.status_code == status
        err = r.json()["error"]
        assert set(err) == {"message", "type", "code", "param"}
        assert err["code"] == ("unknown_url" if status == 404 else "method_not_allowed")
    for method, path, status, kind in [
            ("GET", "/v1/messages", 405, "invalid_request_error"),
            ("GET", "/v1/messages/count_tokens", 405, "invalid_request_error"),
            ("POST", "/v1/messages/batches", 404, "not_found_error")]:
        r = httpx.request(method, f"{gateway.url}{path}", timeout=10)
        assert r.status_code == status, path
        err = ErrorResponse.model_validate(r.json())
        assert err.type == "error" and err.error.type == kind
