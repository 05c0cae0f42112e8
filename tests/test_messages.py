"""`POST /v1/messages` and `/v1/messages/count_tokens` through the real gateway, driven by the
official `anthropic` SDK, on an `anthropic` route (bytes to the fake's /v1/messages) and on
`openai` and `self-hosted` routes (translated to the fake's /v1/chat/completions): every reply
and stream event validated against the SDK's types, the request the fake received asserted field
by field, and limits, usage records and metrics as for chat completions."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from llm_gateway.messages_request import count_message_tokens
from llm_gateway.tokens import count_text_tokens, encoding_name_for
from pydantic import TypeAdapter

from tests.conftest import FakeUpstream, Gateway, sdk_client, unique
from tests.test_metrics import samples, value

FIXTURES = Path(__file__).parent / "fixtures"
EVENT = TypeAdapter(RawMessageStreamEvent)
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
IMAGE_URL = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
WEATHER: Any = {"name": "get_weather", "description": "Weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}
UPSTREAM_KEY = "sk-route-credential"


@dataclass
class Setup:
    client: anthropic.Anthropic
    key: str
    tenant: str
    model: str
    gateway: Gateway
    upstream: FakeUpstream

    def raw(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(f"{self.gateway.url}/v1/messages", json=body, timeout=10,
                          headers={"x-api-key": self.key, "anthropic-version": "2023-06-01",
                                   **headers})


def _setup(gateway: Gateway, upstream: FakeUpstream, provider: str,
           **limits: Any) -> Setup:
    model = unique(provider)
    base = upstream.url if provider == "anthropic" else upstream.openai_base
    gateway.put_model(model, {"provider": provider, "base_url": base,
                              "model": "fake-claude" if provider == "anthropic" else "up",
                              "api_key": UPSTREAM_KEY},
                      input_price_per_mtok=3.0, output_price_per_mtok=15.0)
    tenant = unique("t")
    key = gateway.create_tenant(tenant, **limits)["api_key"]
    client = sdk_client(anthropic.Anthropic, base_url=gateway.url, api_key=key, max_retries=0)
    return Setup(client, key, tenant, model, gateway, upstream)


@pytest.fixture
def claude(gateway: Gateway, fresh_upstream: FakeUpstream) -> Setup:
    return _setup(gateway, fresh_upstream, "anthropic")


@pytest.fixture(params=["openai", "self-hosted"])
def gpt(request: pytest.FixtureRequest, gateway: Gateway, fresh_upstream: FakeUpstream) -> Setup:
    return _setup(gateway, fresh_upstream, request.param)


def strict_message(data: dict[str, Any]) -> Message:
    """A Message the SDK's model knows every field of."""
    message = Message.model_validate(data)
    assert message.model_extra in (None, {}), message.model_extra
    return message


def sse_events(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for frame in text.split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        yield lines["event"], json.loads(lines["data"])


def validated_stream(text: str) -> list[dict[str, Any]]:
    """Every event, validated against the SDK's union; the sequence Anthropic documents."""
    events = []
    for name, data in sse_events(text):
        assert name == data["type"]
        if name != "ping":  # allowed by Anthropic's docs; not in the SDK's union
            EVENT.validate_python(data)
        events.append(data)
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    open_index = None
    for e in events[1:-2]:
        if e["type"] == "content_block_start":
            assert open_index is None
            open_index = e["index"]
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_index
            open_index = None
    assert open_index is None
    return events


def records(gw: Gateway, tid: str, n: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        with gw.admin() as admin:
            got = admin.get(f"/admin/tenants/{tid}/usage").json()["data"]
        if len(got) >= n:
            return got  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"no usage record for {tid}"
        time.sleep(0.05)  # poll interval while the writer drains


# -- anthropic routes: bytes -------------------------------------------------------------------


def test_anthropic_route_create_forwards_bytes(claude: Setup) -> None:
    body: dict[str, Any] = {
        "model": claude.model, "max_tokens": 3, "system": "Be terse.",
        "stop_sequences": ["zz"], "metadata": {"user_id": "u-1"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"},
                                                  IMAGE]}]}
    r = claude.client.messages.create(**body, extra_headers={
        "anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31",
        "OpenAI-Organization": "org-x"})
    strict_message(r.model_dump())
    assert r.content[0].type == "text" and r.content[0].text == "word0 word1 word2"
    assert r.stop_reason == "max_tokens"
    sent = claude.upstream.requests()[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["body"] == {**body, "model": "fake-claude"}
    headers = sent["headers"]
    assert headers["x-api-key"] == UPSTREAM_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert "authorization" not in headers and "openai-organization" not in headers
    assert claude.key not in json.dumps(headers)
    rec = records(claude.gateway, claude.tenant)[0]
    assert (rec["endpoint"], rec["provider"], rec["status"]) == ("messages", "anthropic", 200)
    assert (rec["input_tokens"], rec["output_tokens"]) == (r.usage.input_tokens, 3)
    assert rec["usage_source"] == "upstream"
    assert rec["cost"] == pytest.approx((rec["input_tokens"] * 3 + 3 * 15) / 1e6)


def test_anthropic_route_stream_relays_events_and_reads_usage(claude: Setup) -> None:
    with claude.client.messages.stream(
            model=claude.model, max_tokens=4, system=[{"type": "text", "text": "sys"}],
            messages=[{"role": "user", "content": "one two three"}]) as stream:
        final = stream.get_final_message()
    strict_message(final.model_dump())
    assert final.content[0].type == "text" and final.content[0].text == "word0 word1 word2 word3"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens > 0
    r = claude.raw({"model": claude.model, "max_tokens": 2, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]})
    events = validated_stream(r.text)
    assert events[1]["type"] == "ping"  # relayed as the upstream sent it
    rec = next(x for x in records(claude.gateway, claude.tenant, 2) if x["output_tokens"] == 4)
    assert rec["input_tokens"] == final.usage.input_tokens and rec["stream"] is True
    assert rec["endpoint"] == "messages" and rec["ttft_ms"] is not None


def test_anthropic_route_tool_round_trip(claude: Setup) -> None:
    first = claude.client.messages.create(
        model=claude.model, max_tokens=50, tools=[WEATHER],
        messages=[{"role": "user", "content": "weather in Paris?"}])
    strict_message(first.model_dump())
    use = first.content[0]
    assert use.type == "tool_use" and use.name == "get_weather" and first.stop_reason == "tool_use"
    follow = [{"role": "user", "content": "weather in Paris?"},
              {"role": "assistant", "content": [use.model_dump()]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                            "content": "sunny"}]}]
    claude.client.messages.create(model=claude.model, max_tokens=5, messages=follow)  # type: ignore[arg-type]
    assert claude.upstream.requests()[-1]["body"]["messages"] == follow


def test_claude_code_session_reaches_an_anthropic_route_untouched(claude: Setup) -> None:
    body = json.loads((FIXTURES / "claude_code_session.json").read_text())
    body["model"] = claude.model
    r = claude.raw(body, **{"anthropic-beta": "interleaved-thinking-2025-05-14"})
    assert r.status_code == 200
    validated_stream(r.text)
    sent = claude.upstream.requests()[-1]
    assert sent["body"] == {**body, "model": "fake-claude"}
    thinking = [b for m in sent["body"]["messages"] if isinstance(m["content"], list)
                for b in m["content"] if "thinking" in b["type"]]
    assert len(thinking) == 3 and all(b.get("signature") or b.get("data") for b in thinking)
    assert sent["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"


def test_anthropic_upstream_errors_in_anthropic_shape(claude: Setup) -> None:
    # A Retry-After longer than the gateway waits: no retry, the client gets it.
    claude.upstream.faults({"kind": "status", "status": 429, "retry_after": 7})
    r = claude.raw({"model": claude.model, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    err = ErrorResponse.model_validate(r.json())
    assert err.error.type == "rate_limit_error"
    claude.upstream.faults({"kind": "drop_after", "chunks": 3})
    r = claude.raw({"model": claude.model, "max_tokens": 5, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]})
    events = list(sse_events(r.text))
    name, data = events[-1]
    assert name == "error" and data["type"] == "error"
    assert ErrorResponse.model_validate(data).error.type == "api_error"
    for _, e in events[:-1]:
        if e["type"] != "ping":
            EVENT.validate_python(e)


# -- openai and self-hosted routes: translated -------------------------------------------------


def test_openai_route_create_translates_both_ways(gpt: Setup) -> None:
    r = gpt.client.messages.create(
        model=gpt.model, max_tokens=3, system=[{"type": "text", "text": "Be terse."}],
        stop_sequences=["zz"], extra_body={"temperature": 0.5}, metadata={"user_id": "u-1"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, IMAGE,
                                               IMAGE_URL]}],
        extra_headers={"OpenAI-Organization": "org-x", "OpenAI-Project": "proj-x"})
    strict_message(r.model_dump())
    assert r.content[0].type == "text" and r.content[0].text == "word0 word1 word2"
    assert (r.stop_reason, r.model, r.role) == ("max_tokens", gpt.model, "assistant")
    assert r.id.startswith("msg_")
    sent = gpt.upstream.requests()[-1]
    assert sent["path"] == "/v1/chat/completions"
    limit = "max_completion_tokens" if "openai" in gpt.model else "max_tokens"
    assert sent["body"] == {
        "model": "up", limit: 3, "temperature": 0.5, "stop": ["zz"], "user": "u-1",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}
    headers = sent["headers"]
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not {"x-api-key", "anthropic-version", "openai-organization",
                "openai-project"} & set(headers)
    upstream_usage = (r.usage.input_tokens, r.usage.output_tokens)
    assert upstream_usage[1] == 3 and upstream_usage[0] > 0
    rec = records(gpt.gateway, gpt.tenant)[0]
    assert (rec["endpoint"], rec["provider"]) == ("messages", gpt.model.rsplit("-", 1)[0])
    assert (rec["input_tokens"], rec["output_tokens"]) == upstream_usage


def test_openai_route_tool_round_trip(gpt: Setup) -> None:
    first = gpt.client.messages.create(
        model=gpt.model, max_tokens=50, tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "weather in Paris?"}])
    strict_message(first.model_dump())
    use = first.content[0]
    assert use.type == "tool_use" and use.name == "get_weather"
    assert first.stop_reason == "tool_use" and isinstance(use.input, dict) and use.input
    sent = gpt.upstream.requests()[-1]["body"]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": WEATHER["input_schema"]}}]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("required", False)
    second = gpt.client.messages.create(
        model=gpt.model, max_tokens=2, tools=[WEATHER], messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [use.model_dump()]},  # type: ignore[list-item]
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"},
                {"type": "text", "text": "thanks"}]}])
    strict_message(second.model_dump())
    sent = gpt.upstream.requests()[-1]["body"]
    assert sent["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": use.id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(
                use.input, separators=(",", ":"))}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "sunny"},
        {"role": "user", "content": "thanks"}]


def test_openai_route_stream_announces_the_prompt_first(gpt: Setup) -> None:
    body = {"model": gpt.model, "max_tokens": 4, "system": "sys", "stream": True,
            "messages": [{"role": "user", "content": "one two three"}]}
    r = gpt.raw(body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = validated_stream(r.text)
    start, delta = events[0], events[-2]
    expected = count_message_tokens(body, lambda t: count_text_tokens(
        t, encoding_name_for(gpt.model)))
    assert start["message"]["usage"]["input_tokens"] == expected > 0
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 4
    texts = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert texts == "word0 word1 word2 word3"
    sent = gpt.upstream.requests()[-1]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    with gpt.client.messages.stream(model=gpt.model, max_tokens=50, tools=[WEATHER],
                                    messages=[{"role": "user", "content": "go"}]) as stream:
        final = stream.get_final_message()
    strict_message(final.model_dump())
    assert final.content[0].type == "tool_use" and final.content[0].input
    assert final.stop_reason == "tool_use"
    rec = next(x for x in records(gpt.gateway, gpt.tenant, 2) if x["output_tokens"] == 4)
    assert rec["endpoint"] == "messages" and rec["input_tokens"] > 0 and rec["stream"]


def test_claude_code_session_through_an_openai_route(gateway: Gateway,
                                                     fresh_upstream: FakeUpstream) -> None:
    s = _setup(gateway, fresh_upstream, "openai")
    body = json.loads((FIXTURES / "claude_code_session.json").read_text())
    before = copy.deepcopy(body)
    body["model"] = s.model
    r = s.raw(body)
    assert r.status_code == 200, r.text
    validated_stream(r.text)
    expected = json.loads((FIXTURES / "claude_code_session.openai.json").read_text())
    assert s.upstream.requests()[-1]["body"] == {**expected, "model": "up"}
    assert {k: v for k, v in body.items() if k != "model"} == {
        k: v for k, v in before.items() if k != "model"}


def test_self_hosted_stream_error_becomes_an_error_event(gateway: Gateway,
                                                         fresh_upstream: FakeUpstream) -> None:
    s = _setup(gateway, fresh_upstream, "self-hosted")
    fresh_upstream.faults({"kind": "drop_after", "chunks": 3})
    r = s.raw({"model": s.model, "max_tokens": 8, "stream": True,
               "messages": [{"role": "user", "content": "hi"}]})
    events = list(sse_events(r.text))
    assert events[-1][0] == "error"
    assert ErrorResponse.model_validate(events[-1][1]).error.type in ("api_error",
                                                                      "overloaded_error")
    fresh_upstream.faults({"kind": "drop_after", "chunks": 3})
    with pytest.raises(anthropic.APIStatusError), s.client.messages.stream(
            model=s.model, max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as stream:
        stream.get_final_message()


# -- count_tokens --------------------------------------------------------------------------------


def test_count_tokens_on_both_kinds_of_route(claude: Setup, gateway: Gateway) -> None:
    msgs: Any = [{"role": "user", "content": "one two three"}]
    got = claude.client.messages.count_tokens(model=claude.model, system="sys", messages=msgs,
                                              tools=[WEATHER])
    MessageTokensCount.model_validate(got.model_dump())
    sent = claude.upstream.requests()[-1]
    assert sent["path"] == "/v1/messages/count_tokens"
    assert sent["body"] == {"model": "fake-claude", "system": "sys", "messages": msgs,
                            "tools": [WEATHER]}
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY
    assert got.input_tokens == 1 + 3 + 1  # the fake's count: the message, its words, system
    gpt = _setup(gateway, claude.upstream, "openai")
    body = {"model": gpt.model, "system": "sys", "messages": msgs, "tools": [WEATHER]}
    got = gpt.client.messages.count_tokens(**body)
    assert got.input_tokens == count_message_tokens(
        body, lambda t: count_text_tokens(t, encoding_name_for(gpt.model)))
    assert claude.upstream.requests()[-1]["path"] == "/v1/messages/count_tokens"  # not sent
    time.sleep(0.3)  # the writer's batch interval: a record would have been written by now
    with gateway.admin() as admin:
        assert admin.get(f"/admin/tenants/{gpt.tenant}/usage").json()["data"] == []
    with pytest.raises(anthropic.NotFoundError):
        gpt.client.messages.count_tokens(model="no-such-model", messages=msgs)
    with pytest.raises(anthropic.AuthenticationError):
        wrong = sdk_client(anthropic.Anthropic, base_url=gateway.url, api_key="sk-wrong")
        wrong.messages.count_tokens(model=gpt.model, messages=msgs)


# -- the request path's rules --------------------------------------------------------------------


def test_auth_and_routing_errors_in_anthropic_shape(gateway: Gateway,
                                                    fresh_upstream: FakeUpstream) -> None:
    s = _setup(gateway, fresh_upstream, "openai")
    bearer = sdk_client(anthropic.Anthropic, base_url=gateway.url, auth_token=s.key, max_retries=0)
    r = bearer.messages.create(model=s.model, max_tokens=1,
                               messages=[{"role": "user", "content": "hi"}])
    strict_message(r.model_dump())
    cases: list[tuple[type[Exception], dict[str, Any], str | None]] = [
        (anthropic.AuthenticationError, {"model": s.model}, "sk-wrong"),
        (anthropic.NotFoundError, {"model": "no-such-model"}, None),
        (anthropic.BadRequestError, {"model": s.model, "max_tokens": 0}, None),
    ]
    for error, fields, key in cases:
        client = sdk_client(anthropic.Anthropic, base_url=gateway.url, api_key=key or s.key,
                            max_retries=0)
        with pytest.raises(error) as info:
            client.messages.create(**{"max_tokens": 1, "messages": [  # type: ignore[call-overload]
                {"role": "user", "content": "hi"}], **fields})
        assert isinstance(info.value, anthropic.APIStatusError)
        ErrorResponse.model_validate(info.value.body)
    other = unique("other")
    gateway.put_model(other, {"provider": "openai", "base_url": fresh_upstream.openai_base,
                              "model": "up"})
    limited = gateway.create_tenant(unique("t"), allowed_models=[s.model])["api_key"]
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk_client(anthropic.Anthropic, base_url=gateway.url, api_key=limited,
                   max_retries=0).messages.create(
            model=other, max_tokens=1, messages=[{"role": "user", "content": "hi"}])


def test_rpm_and_tpm_limits_answer_429_in_anthropic_shape(gateway: Gateway,
                                                          fresh_upstream: FakeUpstream) -> None:
    s = _setup(gateway, fresh_upstream, "anthropic", rpm_limit=1)
    msgs: Any = [{"role": "user", "content": "hi"}]
    s.client.messages.create(model=s.model, max_tokens=1, messages=msgs)
    with pytest.raises(anthropic.RateLimitError) as info:
        s.client.messages.create(model=s.model, max_tokens=1, messages=msgs)
    assert float(info.value.response.headers["retry-after"]) > 0
    assert ErrorResponse.model_validate(info.value.body).error.type == "rate_limit_error"
    t = _setup(gateway, fresh_upstream, "openai", tpm_limit=40)
    with pytest.raises(anthropic.RateLimitError) as info:
        t.client.messages.create(model=t.model, max_tokens=500, messages=msgs)
    assert "can never fit" in info.value.message
    r = t.client.messages.create(model=t.model, max_tokens=5, messages=msgs)
    # ~8 prompt tokens + 31 fit in 40, but not beside the ~7 the first request used.
    with pytest.raises(anthropic.RateLimitError) as info:
        t.client.messages.create(model=t.model, max_tokens=31, messages=msgs)
    assert "tokens per minute" in info.value.message
    assert float(info.value.response.headers["retry-after"]) > 0
    ok = [x for x in records(gateway, t.tenant, 3) if x["status"] == 200]
    assert [(x["input_tokens"], x["output_tokens"], x["endpoint"]) for x in ok] == [
        (r.usage.input_tokens, 5, "messages")]


def test_endpoint_label_in_request_metrics(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    s = _setup(gateway, fresh_upstream, "openai")
    s.client.messages.create(model=s.model, max_tokens=1,
                             messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 10
    while True:
        got = samples(httpx.get(f"{gateway.url}/metrics", timeout=10).text)
        n = value(got, "llm_gateway_requests_total", tenant=s.tenant, model=s.model,
                  provider="openai", status="200", endpoint="messages")
        if n == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # poll interval: the metrics are written as the request ends
    assert n == 1
    assert value(got, "llm_gateway_request_duration_seconds_count", model=s.model,
                 provider="openai", endpoint="messages") == 1
