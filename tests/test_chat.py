"""Chat completions through the real gateway (2 Granian workers) to the fake OpenAI upstream,
driven by the official openai SDK, sync and async."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import FakeUpstream, Gateway, sdk_client, unique


@pytest.fixture
def tenant_key(gateway: Gateway, upstream: FakeUpstream) -> tuple[str, str]:
    """A tenant allowed to use one new model routed to the fake upstream; returns (key, model)."""
    model = unique("m")
    gateway.put_model(model, {"provider": "openai", "base_url": upstream.openai_base,
                              "model": "fake-gpt-4o", "api_key": "sk-upstream-secret"})
    created = gateway.create_tenant(unique("t"), allowed_models=[model])
    return created["api_key"], model


def test_non_stream_completion(gateway: Gateway, fresh_upstream: FakeUpstream,
                               tenant_key: tuple[str, str]) -> None:
    key, model = tenant_key
    client = sdk_client(openai.OpenAI, base_url=gateway.base_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
        extra_body={"unknown_field": {"kept": True}},
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "word0 word1 word2 word3 word4"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert raw.headers["x-request-id"].startswith("req_")
    client.close()

    sent = fresh_upstream.requests()[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == "fake-gpt-4o"  # upstream model substituted
    assert sent["body"]["unknown_field"] == {"kept": True}  # unknown fields pass through
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-secret"


def test_stream_completion(gateway: Gateway, fresh_upstream: FakeUpstream,
                           tenant_key: tuple[str, str]) -> None:
    key, model = tenant_key
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as client:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"word{i}" for i in range(8))
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The gateway asked the upstream for usage (to reconcile limits), but the client did not:
    # the usage-only chunk must not reach it.
    assert all(c.usage is None for c in chunks)
    assert fresh_upstream.requests()[-1]["body"]["stream_options"] == {"include_usage": True}


def test_stream_with_usage_and_done_marker(gateway: Gateway, upstream: FakeUpstream,
                                           tenant_key: tuple[str, str]) -> None:
    key, model = tenant_key
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    assert usage["completion_tokens"] == 8


async def test_async_client_concurrent(gateway: Gateway, upstream: FakeUpstream,
                                       tenant_key: tuple[str, str]) -> None:
    import asyncio

    key, model = tenant_key
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key,
                                  max_retries=0) as client:
        async def one(i: int) -> str:
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"n{i}"}], max_tokens=2)
            return r.choices[0].message.content or ""

        results = await asyncio.gather(*(one(i) for i in range(20)))
        assert results == ["word0 word1"] * 20

        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "s"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("word0 word1")


def test_models_list_only_allowed(gateway: Gateway, upstream: FakeUpstream) -> None:
    a, b = unique("ma"), unique("mb")
    for m in (a, b):
        gateway.put_model(m, {"provider": "self-hosted", "base_url": upstream.openai_base,
                              "model": "llama"})
    key = gateway.create_tenant(unique("t"), allowed_models=[a])["api_key"]
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as client:
        ids = [m.id for m in client.models.list()]
        assert ids == [a]
        assert client.models.retrieve(a).owned_by == "self-hosted"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(b)


def test_request_id_echoed(gateway: Gateway, tenant_key: tuple[str, str]) -> None:
    key, _ = tenant_key
    r = httpx.get(f"{gateway.base_url}/models", headers={
        "Authorization": f"Bearer {key}", "X-Request-ID": "client-chosen-42"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-chosen-42"
    assert httpx.get(f"{gateway.url}/healthz").headers["x-request-id"].startswith("req_")
