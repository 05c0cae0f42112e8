"""`/v1/responses` through the real gateway, driven by the official openai SDK, to an `openai`
route (bytes relayed), an `anthropic` route and a `self-hosted` route (translated): every
response and stream event validated against the SDK's own types, the request each fake upstream
received asserted field by field; stored responses (GET, DELETE, cancel) per tenant; limits,
usage records and metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import FakeUpstream, Gateway, sdk_client, unique
from tests.test_metrics import scrape, value
from tests.test_usage import wait_for

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
FIXTURES = Path(__file__).parent / "fixtures"
IMAGE = "data:image/png;base64,AAAA"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
TRANSLATED = ("anthropic", "self-hosted")


def target(provider: str, upstream: FakeUpstream) -> dict[str, Any]:
    base = upstream.url if provider == "anthropic" else upstream.openai_base
    return {"provider": provider, "base_url": base, "model": f"up-{provider}",
            "api_key": "sk-upstream"}


def setup(gateway: Gateway, upstream: FakeUpstream, provider: str,
          **tenant: Any) -> tuple[openai.OpenAI, str, str]:
    model = unique(provider)
    gateway.put_model(model, target(provider, upstream))
    tenant_id = unique("t")
    key = gateway.create_tenant(tenant_id, **tenant)["api_key"]
    client = sdk_client(openai.OpenAI, base_url=gateway.base_url, api_key=key, max_retries=0)
    return client, model, tenant_id


def create(client: openai.OpenAI, **params: Any) -> Response:
    """`client.responses.create`, its JSON validated strictly against the SDK's `Response`."""
    raw = client.responses.with_raw_response.create(**params)
    Response.model_validate(raw.http_response.json(), strict=True)
    return raw.parse()


def raw_events(gateway: Gateway, client: openai.OpenAI, body: dict[str, Any]) -> list[Any]:
    """The stream as it goes over the wire: `event:` and `data:` lines, each event validated
    against the SDK's union, numbered from 0, no `[DONE]`."""
    events: list[Any] = []
    with httpx.stream("POST", f"{gateway.base_url}/responses", json={**body, "stream": True},
                      headers={"authorization": f"Bearer {client.api_key}"}, timeout=10) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    for frame in text.split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        events.append(EVENTS.validate_python(data))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "[DONE]" not in text
    return events


def sent(upstream: FakeUpstream) -> dict[str, Any]:
    return upstream.requests()[-1]  # type: ignore[no-any-return]


# -- openai: the bytes pass through ----------------------------------------------------------------


def test_openai_route_relays_the_request_and_reply(gateway: Gateway,
                                                   fresh_upstream: FakeUpstream) -> None:
    client, model, tenant = setup(gateway, fresh_upstream, "openai")
    body = {"model": model, "instructions": "Be brief now", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello there"},
                                     {"type": "input_image", "image_url": IMAGE,
                                      "detail": "auto"}]}],
        "reasoning": {"effort": "low"}, "store": True, "max_output_tokens": 3,
        "metadata": {"k": "v"}}
    r = create(client, **body)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "word0 word1 word2"
    got = sent(fresh_upstream)
    assert got["path"] == "/v1/responses"
    assert got["headers"]["authorization"] == "Bearer sk-upstream"
    assert got["body"] == {**body, "model": "up-openai"}  # only the model is substituted
    assert r.usage is not None
    assert r.usage.input_tokens_details.cached_tokens == 3  # the fake: words of instructions
    assert r.usage.output_tokens_details.reasoning_tokens == 2
    [record] = wait_for(gateway, tenant, 1)["data"]
    assert (record["input_tokens"], record["output_tokens"]) == (
        r.usage.input_tokens, r.usage.output_tokens)
    assert (record["cached_input_tokens"], record["reasoning_tokens"]) == (3, 2)
    assert record["usage_source"] == "upstream" and record["provider"] == "openai"
    assert record["endpoint"] == "responses"


def test_openai_route_stream(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    client, model, tenant = setup(gateway, fresh_upstream, "openai")
    with client.responses.stream(model=model, input="say words",
                                 instructions="short") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == " ".join(f"word{i}" for i in range(8))
    assert sent(fresh_upstream)["body"] == {"model": "up-openai", "input": "say words",
                                            "instructions": "short", "stream": True}
    events = raw_events(gateway, client, {"model": model, "input": "say words"})
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    records = wait_for(gateway, tenant, 2)["data"]
    assert all(r["usage_source"] == "upstream" and r["stream"] for r in records)
    assert records[0]["cached_input_tokens"] == 1  # "short"


def test_openai_route_mid_stream_failure_ends_with_an_error_event(
        gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    client, model, _ = setup(gateway, fresh_upstream, "openai")
    fresh_upstream.faults({"kind": "drop_after", "chunks": 4})
    events = raw_events(gateway, client, {"model": model, "input": "hi"})
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress",
                                            "response.output_item.added",
                                            "response.content_part.added"]
    assert events[-1].type == "error" and events[-1].code == "upstream_disconnected"


def test_stored_responses_per_tenant(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    client, model, tenant = setup(gateway, fresh_upstream, "openai")
    other, _, _ = setup(gateway, fresh_upstream, "openai")
    first = create(client, model=model, input="remember this")
    with client.responses.stream(model=model, input="and this") as stream:
        streamed = stream.get_final_response()
    for rid in (first.id, streamed.id):
        got = client.responses.retrieve(rid)
        Response.model_validate(got.model_dump(mode="json"), strict=True)
        assert got.id == rid and got.output_text
        request = sent(fresh_upstream)
        assert (request["method"], request["path"]) == ("GET", f"/v1/responses/{rid}")
        assert request["headers"]["authorization"] == "Bearer sk-upstream"
        with pytest.raises(openai.NotFoundError) as err:  # another tenant: not even a hint
            other.responses.retrieve(rid)
        assert "No response found" in err.value.message
    # previous_response_id goes to OpenAI untouched, for the tenant's own responses only
    follow = create(client, model=model, input="more", previous_response_id=first.id)
    assert sent(fresh_upstream)["body"]["previous_response_id"] == first.id
    assert follow.previous_response_id == first.id
    with pytest.raises(openai.BadRequestError) as bad:
        other.responses.create(model=model, input="x", previous_response_id=first.id)
    assert bad.value.param == "previous_response_id"
    assert bad.value.code == "previous_response_not_found"
    cancelled = client.responses.cancel(streamed.id)
    assert cancelled.status == "cancelled"
    assert sent(fresh_upstream)["path"] == f"/v1/responses/{streamed.id}/cancel"
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(first.id)
    client.responses.delete(first.id)
    assert (sent(fresh_upstream)["method"], sent(fresh_upstream)["path"]) == (
        "DELETE", f"/v1/responses/{first.id}")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # store: false is not stored upstream, so not remembered either
    unstored = create(client, model=model, input="forget", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_never_seen")
    assert wait_for(gateway, tenant, 4)["totals"]["requests"] == 4  # GET/DELETE: no records


# -- anthropic and self-hosted: translated ---------------------------------------------------------


def expected_upstream(provider: str, *, system: str, messages: list[dict[str, Any]],
                      **extra: Any) -> dict[str, Any]:
    """What a translated request looks like upstream, for the simple text cases."""
    if provider == "anthropic":
        return {"model": "up-anthropic", "max_tokens": extra.pop("max_tokens", 4096),
                "system": system, "messages": messages, **extra}
    return {"model": "up-self-hosted", "messages": [{"role": "system", "content": system},
                                                    *messages], **extra}


@pytest.mark.parametrize("provider", TRANSLATED)
def test_translated_text_instructions_image(provider: str, gateway: Gateway,
                                            fresh_upstream: FakeUpstream) -> None:
    client, model, tenant = setup(gateway, fresh_upstream, provider)
    r = create(client, model=model, instructions="You are terse.", temperature=0.5,
               input=[{"role": "user", "content": [
                   {"type": "input_text", "text": "what is this"},
                   {"type": "input_image", "image_url": IMAGE, "detail": "auto"}]}])
    assert r.status == "completed" and r.model == model and r.object == "response"
    assert r.output_text == " ".join(f"word{i}" for i in range(8))
    assert r.instructions == "You are terse." and r.temperature == 0.5
    assert r.id.startswith("resp_") and r.usage is not None and r.usage.output_tokens == 8
    got = sent(fresh_upstream)
    if provider == "anthropic":
        assert got["path"] == "/v1/messages"
        assert got["headers"]["x-api-key"] == "sk-upstream"
        assert got["body"] == expected_upstream(provider, system="You are terse.",
                                                temperature=0.5, messages=[{
            "role": "user", "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "AAAA"}}]}])
    else:
        assert got["path"] == "/v1/chat/completions"
        assert got["headers"]["authorization"] == "Bearer sk-upstream"
        assert got["body"] == expected_upstream(provider, system="You are terse.",
                                                temperature=0.5, messages=[{
            "role": "user", "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": IMAGE, "detail": "auto"}}]}])
    # stored nowhere: the gateway's own id cannot be fetched
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(r.id)
    assert "not stored" in err.value.message
    [record] = wait_for(gateway, tenant, 1)["data"]
    assert record["provider"] == provider and record["output_tokens"] == 8
    assert record["input_tokens"] == r.usage.input_tokens > 0


@pytest.mark.parametrize("provider", TRANSLATED)
def test_translated_stream_events(provider: str, gateway: Gateway,
                                  fresh_upstream: FakeUpstream) -> None:
    client, model, tenant = setup(gateway, fresh_upstream, provider)
    with client.responses.stream(model=model, input="say words",
                                 instructions="short") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == " ".join(f"word{i}" for i in range(8))
    assert final.usage is not None and final.usage.output_tokens == 8
    body = sent(fresh_upstream)["body"]
    assert body["stream"] is True
    if provider == "self-hosted":
        assert body["stream_options"] == {"include_usage": True}
    events = raw_events(gateway, client, {"model": model, "input": "say words"})
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 8,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert all(e.logprobs == [] for e in events if e.type == "response.output_text.delta")
    records = wait_for(gateway, tenant, 2)["data"]
    assert [r["output_tokens"] for r in records] == [8, 8]


@pytest.mark.parametrize("provider", TRANSLATED)
def test_translated_function_call_round_trip(provider: str, gateway: Gateway,
                                             fresh_upstream: FakeUpstream) -> None:
    client, model, _ = setup(gateway, fresh_upstream, provider)
    first = create(client, model=model, input="weather in Rome?", tools=[WEATHER],
                   tool_choice="auto")
    [call] = [i for i in first.output if i.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {
        "input": " ".join(f"word{i}" for i in range(8))}
    with client.responses.stream(model=model, input="weather in Rome?",
                                 tools=[WEATHER]) as stream:  # type: ignore[list-item]
        arg_deltas = [e.delta for e in stream
                      if e.type == "response.function_call_arguments.delta"]
        streamed = stream.get_final_response()
    [streamed_call] = streamed.output
    assert streamed_call.type == "function_call"
    assert "".join(arg_deltas) == streamed_call.arguments
    assert json.loads(streamed_call.arguments) == json.loads(call.arguments)
    events = raw_events(gateway, client, {"model": model, "input": "x", "tools": [WEATHER]})
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        *["response.function_call_arguments.delta"] * (len(events) - 6),
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    follow = create(client, model=model, tools=[WEATHER], input=[
        {"role": "user", "content": "weather in Rome?"},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.output[0].type == "function_call"
    body = sent(fresh_upstream)["body"]
    if provider == "anthropic":
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "weather in Rome?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.call_id,
                                               "name": "get_weather",
                                               "input": json.loads(call.arguments)}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.call_id,
                                          "content": "sunny"}]}]
        assert body["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                                  "input_schema": WEATHER["parameters"]}]
    else:
        assert body["messages"] == [
            {"role": "user", "content": "weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call.call_id, "type": "function", "function": {
                    "name": "get_weather", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
        assert body["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city",
            "parameters": WEATHER["parameters"]}}]


@pytest.mark.parametrize("provider", TRANSLATED)
def test_translated_max_output_tokens_reaches_incomplete(provider: str, gateway: Gateway,
                                                         fresh_upstream: FakeUpstream) -> None:
    client, model, _ = setup(gateway, fresh_upstream, provider)
    r = create(client, model=model, input="long answer", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens" and r.max_output_tokens == 2
    assert r.output_text == "word0 word1"
    assert sent(fresh_upstream)["body"]["max_tokens"] == 2
    events = raw_events(gateway, client, {"model": model, "input": "x", "max_output_tokens": 2})
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("provider", TRANSLATED)
def test_translated_errors(provider: str, gateway: Gateway,
                           fresh_upstream: FakeUpstream) -> None:
    client, model, _ = setup(gateway, fresh_upstream, provider)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="x", tools=[{"type": "web_search"}])
    assert "web_search" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="x", previous_response_id="resp_1")
    assert err.value.param == "previous_response_id" and "whole input" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="x", max_output_tokens=0)
    assert err.value.param == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-route", input="x")
    requests_before = len(fresh_upstream.requests())
    fresh_upstream.faults({"kind": "status", "status": 400})
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=model, input="x")
    assert len(fresh_upstream.requests()) == requests_before + 1  # a 400 is not retried
    fresh_upstream.faults({"kind": "drop_after", "chunks": 5})
    events = raw_events(gateway, client, {"model": model, "input": "x"})
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"


def test_failover_before_the_first_byte(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    model = unique("fo")
    dead = {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gone"}
    gateway.put_model(model, dead, target("anthropic", fresh_upstream))
    client = sdk_client(openai.OpenAI, base_url=gateway.base_url, max_retries=0,
                           api_key=gateway.create_tenant(unique("t"))["api_key"])
    with client.responses.stream(model=model, input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text and sent(fresh_upstream)["path"] == "/v1/messages"


@pytest.mark.parametrize("provider", TRANSLATED)
def test_codex_session_replays(provider: str, gateway: Gateway,
                               fresh_upstream: FakeUpstream) -> None:
    session = json.loads((FIXTURES / "codex_session.json").read_text())["request"]
    client, model, _ = setup(gateway, fresh_upstream, provider)
    params = {k: v for k, v in session.items() if k != "stream"}
    with client.responses.stream(**{**params, "model": model}) as stream:
        final = stream.get_final_response()
    [call] = final.output  # the fake calls the first tool, "shell"
    assert call.type == "function_call" and call.name == "shell"
    assert final.tools is not None and [t.name for t in final.tools] == [  # type: ignore[union-attr]
        "shell", "update_plan", "view_image"]
    body = sent(fresh_upstream)["body"]
    if provider == "anthropic":
        assert body["system"].startswith(session["instructions"])
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert [b["type"] for b in body["messages"][1]["content"]] == [
            "text", "tool_use", "tool_use"]
        assert [b["tool_use_id"] for b in body["messages"][2]["content"]] == [
            "call_tests", "call_readme"]
        assert [t["name"] for t in body["tools"]] == ["shell", "update_plan", "view_image"]
    else:
        assert [m["role"] for m in body["messages"]] == [
            "system", "system", "user", "user", "assistant", "tool", "tool"]
        assert [c["id"] for c in body["messages"][4]["tool_calls"]] == [
            "call_tests", "call_readme"]
        assert body["parallel_tool_calls"] is True
    assert not {"reasoning", "store", "include", "prompt_cache_key", "text"} & set(body)
    # The reply's call and its output go back: the next turn replays too.
    follow = [*session["input"],
              {"type": "function_call", "call_id": call.call_id, "name": call.name,
               "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "ok"}]
    again = create(client, **{**params, "model": model, "input": follow})
    assert again.output[0].type == "function_call"


# -- limits, usage, metrics --------------------------------------------------------------------


@pytest.fixture
def rpm_one(gateway: Gateway, fresh_upstream: FakeUpstream) -> Iterator[tuple[openai.OpenAI,
                                                                            str, str]]:
    yield setup(gateway, fresh_upstream, "anthropic", rpm_limit=1)


def test_limits_and_metrics(gateway: Gateway, fresh_upstream: FakeUpstream,
                            rpm_one: tuple[openai.OpenAI, str, str]) -> None:
    client, model, tenant = rpm_one
    create(client, model=model, input="one")
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model=model, input="two")
    assert err.value.response.headers["retry-after"]
    tpm_client, tpm_model, tpm_tenant = setup(gateway, fresh_upstream, "self-hosted",
                                              tpm_limit=50)
    with pytest.raises(openai.RateLimitError):  # the reservation alone is more than the bucket
        tpm_client.responses.create(model=tpm_model, input="x", max_output_tokens=1000)
    records = wait_for(gateway, tenant, 2)["data"]
    assert sorted(r["status"] for r in records) == [200, 429]
    deadline = time.monotonic() + 10
    while True:
        got = scrape(gateway)
        ok = value(got, "llm_gateway_requests_total", tenant=tenant, model=model,
                   provider="anthropic", status="200", endpoint="responses")
        if ok == 1 or time.monotonic() > deadline:
            break
    assert ok == 1
    assert value(got, "llm_gateway_requests_total", tenant=tenant, model=model, provider="",
                 status="429", endpoint="responses") == 1
    assert value(got, "llm_gateway_rate_limited_total", tenant=tenant, limit="rpm") == 1
    assert value(got, "llm_gateway_tokens_total", tenant=tenant, model=model,
                 type="output") == 8
    # The never-fitting reservation was refused before any upstream call: one 429 record.
    tpm_records = wait_for(gateway, tpm_tenant, 1)["data"]
    assert [(r["status"], r["endpoint"], r["input_tokens"]) for r in tpm_records] == [
        (429, "responses", 0)]
