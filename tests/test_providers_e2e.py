"""Anthropic and self-hosted targets through the real gateway, driven by the openai SDK: what
the client sees, and what the fake Anthropic upstream received, field by field."""

from __future__ import annotations

import json
from functools import partial

import openai
import pytest
from llm_gateway.providers.openai import OpenAIStream
from llm_gateway.tokens import OutputTally

from tests.conftest import FakeUpstream, Gateway, sdk_client, unique


@pytest.fixture
def claude(gateway: Gateway, fresh_upstream: FakeUpstream) -> tuple[openai.OpenAI, str]:
    model = unique("claude")
    gateway.put_model(model, {"provider": "anthropic", "base_url": fresh_upstream.url,
                              "model": "fake-claude", "api_key": "sk-ant-upstream"})
    key = gateway.create_tenant(unique("t"))["api_key"]
    return sdk_client(openai.OpenAI, base_url=gateway.base_url, api_key=key, max_retries=0), model


def test_anthropic_non_stream(claude: tuple[openai.OpenAI, str],
                              fresh_upstream: FakeUpstream) -> None:
    client, model = claude
    r = client.chat.completions.create(model=model, max_tokens=5, temperature=0.5, stop=["zz"],
                                       user="user-7", messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "user", "content": [
            {"type": "text", "text": "and this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert r.choices[0].message.content == "word0 word1 word2 word3 word4"
    assert r.choices[0].finish_reason == "length"
    assert r.model == model
    assert r.usage is not None and r.usage.completion_tokens == 5
    sent = fresh_upstream.requests()[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == "sk-ant-upstream"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"] == {
        "model": "fake-claude", "max_tokens": 5, "temperature": 0.5,
        "stop_sequences": ["zz"], "metadata": {"user_id": "user-7"},
        "system": "You are terse.",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hello there"},
            {"type": "text", "text": "and this"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}}]}],
    }
    assert r.usage.prompt_tokens > 0


def test_anthropic_stream_with_tools_and_usage(claude: tuple[openai.OpenAI, str],
                                               fresh_upstream: FakeUpstream) -> None:
    client, model = claude
    stream = client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "find cats"}],
        tools=[{"type": "function", "function": {
            "name": "search", "description": "Search", "parameters": {
                "type": "object", "properties": {"input": {"type": "string"}}}}}])
    chunks = list(stream)
    fragments = [c.choices[0].delta.tool_calls[0] for c in chunks
                 if c.choices and c.choices[0].delta.tool_calls]
    assert fragments[0].function is not None and fragments[0].function.name == "search"
    arguments = "".join((f.function.arguments or "") for f in fragments if f.function)
    assert len(fragments) > 2  # arguments arrived in several pieces
    assert "input" in json.loads(arguments)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    sent = fresh_upstream.requests()[-1]["body"]
    assert sent["stream"] is True
    assert sent["tools"][0]["name"] == "search"
    assert sent["tools"][0]["input_schema"]["properties"] == {"input": {"type": "string"}}


def test_anthropic_errors_map(claude: tuple[openai.OpenAI, str],
                              fresh_upstream: FakeUpstream) -> None:
    client, model = claude
    fresh_upstream.faults({"kind": "status", "status": 529}, {"kind": "status", "status": 529})
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503
    fresh_upstream.faults({"kind": "status", "status": 400})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])


def test_self_hosted_counts_tokens_when_usage_missing() -> None:
    tr = OpenAIStream(client_wants_usage=False, count=partial(OutputTally, "cl100k_base"),
                      fill_missing=True)
    out = tr.feed(b'data: {"choices":[{"index":0,"delta":{"content":"hello world"}}]}\n\n'
                  b'data: {"choices":[{"index":0,"delta":{"content":" again"}}]}\n\n')
    out += tr.finish()
    frames = [json.loads(f[6:]) for f in out.split(b"\n\n") if f and f != b"data: [DONE]"]
    assert all(f["id"].startswith("chatcmpl-") and f["created"] > 0 for f in frames)
    assert len({f["id"] for f in frames}) == 1
    assert out.endswith(b"data: [DONE]\n\n")
    usage = tr.usage()
    assert not usage.reported and tr.generated.count() == 3


@pytest.mark.parametrize("wants_usage", [False, True])
def test_openai_stream_relays_frames_untouched_and_takes_usage(wants_usage: bool) -> None:
    frames = [b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"w%d"}}],"usage":null}'
              % i for i in range(5)]
    usage = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5}}'
    stream = b"\n\n".join([*frames, usage, b"data: [DONE]"]) + b"\n\n"
    expected = b"\n\n".join([*frames, *([usage] if wants_usage else []), b"data: [DONE]"])
    for cut in range(0, len(stream) + 1, 7):  # the whole stream in one block, and in pieces
        tr = OpenAIStream(client_wants_usage=wants_usage, count=partial(OutputTally, "cl100k_base"),
                          fill_missing=False)
        out = tr.feed(stream[:cut]) + tr.feed(stream[cut:]) + tr.finish()
        assert out == expected + b"\n\n", cut
        got = tr.usage()
        assert got.reported and (got.input_tokens, got.output_tokens) == (7, 5)
