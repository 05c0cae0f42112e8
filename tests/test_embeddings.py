"""`POST /v1/embeddings` through the real gateway with the official `openai` SDK: float and base64
(the SDK's default), the request the fake upstream received, TPM reserve and settle on the input
tokens, the usage record (input tokens, output 0, the route's input price), the endpoint metric
label, and a 400 for a route whose target cannot embed."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import httpx
import openai
import pytest
from llm_gateway.embeddings_request import input_tokens
from llm_gateway.testing.fake_upstream import EMBEDDING_DIMENSIONS, fake_embedding
from llm_gateway.tokens import count_text_tokens
from openai.types import CreateEmbeddingResponse

from tests.conftest import FakeUpstream, Gateway, sdk_client, unique
from tests.test_messages import records
from tests.test_metrics import samples, value

UPSTREAM_KEY = "sk-embed-route"


def _route(gateway: Gateway, upstream: FakeUpstream, provider: str = "openai") -> str:
    model = unique("emb")
    base = upstream.url if provider == "anthropic" else upstream.openai_base
    gateway.put_model(model, {"provider": provider, "base_url": base, "model": "text-embed-up",
                              "api_key": UPSTREAM_KEY},
                      input_price_per_mtok=2.0, output_price_per_mtok=50.0)
    return model


def _client(gateway: Gateway, **limits: Any) -> tuple[openai.OpenAI, str]:
    tenant = unique("t")
    key = gateway.create_tenant(tenant, **limits)["api_key"]
    return sdk_client(openai.OpenAI, base_url=gateway.base_url, api_key=key, max_retries=0), tenant


@pytest.mark.parametrize("provider", ["openai", "self-hosted"])
def test_float_and_base64_through_the_sdk(gateway: Gateway, fresh_upstream: FakeUpstream,
                                          provider: str) -> None:
    model = _route(gateway, fresh_upstream, provider)
    client, tenant = _client(gateway)
    got = client.embeddings.create(model=model, input=["hello world", "one"],
                                   encoding_format="float")
    CreateEmbeddingResponse.model_validate(got.model_dump())
    assert [d.embedding for d in got.data] == [fake_embedding("hello world"),
                                               fake_embedding("one")]
    sent = fresh_upstream.requests()[-1]
    assert sent["path"] == "/v1/embeddings"
    assert sent["body"] == {"model": "text-embed-up", "input": ["hello world", "one"],
                            "encoding_format": "float"}
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    default = client.embeddings.create(model=model, input="hello world")  # base64 by default
    assert fresh_upstream.requests()[-1]["body"]["encoding_format"] == "base64"
    packed = struct.pack(f"<{EMBEDDING_DIMENSIONS}f", *fake_embedding("hello world"))
    expected = struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", packed)
    assert default.data[0].embedding == pytest.approx(list(expected))
    raw = httpx.post(f"{gateway.base_url}/embeddings", timeout=10, json={
        "model": model, "input": [[1, 2, 3]], "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {client.api_key}"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)
    assert len(base64.b64decode(raw["data"][0]["embedding"])) == 4 * EMBEDDING_DIMENSIONS
    recs = records(gateway, tenant, 3)
    assert {(r["endpoint"], r["provider"], r["status"], r["output_tokens"]) for r in recs} == {
        ("embeddings", provider, 200, 0)}
    assert sorted(r["input_tokens"] for r in recs) == [2, 3, 3]  # the fake's counts
    assert all(r["cost"] == pytest.approx(r["input_tokens"] * 2.0 / 1e6) for r in recs)


def test_input_tokens_count_every_shape() -> None:
    enc = "cl100k_base"
    assert input_tokens("hello world", enc) == count_text_tokens("hello world", enc)
    assert input_tokens(["a b", "c"], enc) == count_text_tokens("a b", enc) + 1
    assert input_tokens([5, 6, 7], enc) == 3
    assert input_tokens([[1, 2], [3]], enc) == 3


@pytest.mark.parametrize("bad", [None, [], 5, [1, "a"], [[]], [[1, -2]], ["a", 1], [True],
                                 ["x"] * 2049])
def test_bad_input_is_a_400_with_param(gateway: Gateway, fresh_upstream: FakeUpstream,
                                       bad: Any) -> None:
    model = _route(gateway, fresh_upstream)
    client, _ = _client(gateway)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, input=bad)
    assert info.value.param == "input"


def test_tpm_reserves_and_settles_the_input(gateway: Gateway,
                                            fresh_upstream: FakeUpstream) -> None:
    model = _route(gateway, fresh_upstream)
    client, tenant = _client(gateway, tpm_limit=30)
    text = "word " * 20  # 20 tokens here, 20 words at the fake
    client.embeddings.create(model=model, input=text)
    with pytest.raises(openai.RateLimitError) as info:  # 20 more do not fit beside 20 used
        client.embeddings.create(model=model, input=text)
    assert float(info.value.response.headers["retry-after"]) > 0
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model=model, input="word " * 40)
    assert "can never fit" in info.value.message
    ok = [r for r in records(gateway, tenant, 3) if r["status"] == 200]
    assert [(r["input_tokens"], r["output_tokens"]) for r in ok] == [(20, 0)]


def test_an_anthropic_route_cannot_embed(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    model = _route(gateway, fresh_upstream, "anthropic")
    client, _ = _client(gateway)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, input="hi")
    assert info.value.code == "unsupported_endpoint" and info.value.param == "model"
    assert model in info.value.message and "embeddings" in info.value.message
    assert fresh_upstream.requests() == []


def test_endpoint_label(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    model = _route(gateway, fresh_upstream)
    client, tenant = _client(gateway)
    client.embeddings.create(model=model, input="hi")
    deadline = time.monotonic() + 10
    while True:
        got = samples(httpx.get(f"{gateway.url}/metrics", timeout=10).text)
        n = value(got, "llm_gateway_requests_total", tenant=tenant, model=model,
                  provider="openai", status="200", endpoint="embeddings")
        if n == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # poll interval: the metrics are written as the request ends
    assert n == 1
    assert value(got, "llm_gateway_tokens_total", tenant=tenant, model=model,
                 type="input") == 1
