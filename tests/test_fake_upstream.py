"""The fake upstreams, driven by the official openai and anthropic SDKs over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import ToolParam
from openai.types.chat import ChatCompletionToolParam

from tests.conftest import FakeUpstream, fake_upstream_process

WORDS8 = "word0 word1 word2 word3 word4 word5 word6 word7"
# 2 messages (1 each) + "You are terse." (3) + "hello there friend" (3) = 8
OPENAI_MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there friend"},
]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
CLAUDE_TOOL: ToolParam = {
    "name": "lookup",
    "description": "Look something up",
    "input_schema": {"type": "object", "properties": {"input": {"type": "string"}}},
}


@pytest.fixture
def base_url(upstream: FakeUpstream) -> str:
    return upstream.url


@pytest.fixture
def control(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url) as client:
        client.post("/_control/reset").raise_for_status()
        yield client


@pytest.fixture
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(base_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0) as client:
        yield client


def queue(control: httpx.Client, *faults: dict[str, Any]) -> None:
    control.post("/_control/faults", json={"faults": list(faults)}).raise_for_status()


def wait_for(fetch: Callable[[], list[Any]], deadline_s: float = 2.0) -> list[Any]:
    """Poll until `fetch` returns a non-empty list."""
    deadline = time.monotonic() + deadline_s
    while not (items := fetch()):
        assert time.monotonic() < deadline, "nothing arrived before the deadline"
        time.sleep(0.02)
    return items


def events(control: httpx.Client) -> list[dict[str, Any]]:
    return list(control.get("/_control/events").json())


def claude_create(claude: anthropic.Anthropic, **extra: Any) -> anthropic.types.Message:
    return claude.messages.create(
        model="fake-claude", max_tokens=100, system="Be brief.",
        messages=[{"role": "user", "content": "hello there"}], **extra,
    )


def test_openai_chat_non_stream(oai: openai.OpenAI, control: httpx.Client) -> None:
    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=OPENAI_MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == WORDS8
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                "total_tokens"}) == {
        "prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}


def test_openai_max_completion_tokens_caps_reply(oai: openai.OpenAI, control: httpx.Client) -> None:
    completion = oai.chat.completions.create(
        model="m", messages=OPENAI_MESSAGES, max_completion_tokens=3)
    assert completion.choices[0].message.content == "word0 word1 word2"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_openai_stream_with_usage(oai: openai.OpenAI, control: httpx.Client) -> None:
    with oai.chat.completions.create(
        model="gpt-4o", messages=OPENAI_MESSAGES, stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert deltas == ["word0"] + [f" word{i}" for i in range(1, 8)]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, 8)
    assert {c.model for c in chunks} == {"gpt-4o"}
    assert len({c.id for c in chunks}) == 1


def test_openai_tool_call(oai: openai.OpenAI, control: httpx.Client) -> None:
    completion = oai.chat.completions.create(
        model="m", messages=OPENAI_MESSAGES, tools=[WEATHER_TOOL])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"input": WORDS8}


def test_openai_tool_call_stream(oai: openai.OpenAI, control: httpx.Client) -> None:
    with oai.chat.completions.create(
        model="m", messages=OPENAI_MESSAGES, tools=[WEATHER_TOOL],
        stream=True,
    ) as stream:
        chunks = list(stream)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function and calls[0].function.name == "get_weather"
    fragments = [tc.function.arguments for tc in calls[1:] if tc.function]
    assert len(fragments) > 2
    assert json.loads("".join(f or "" for f in fragments)) == {"input": WORDS8}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_models(oai: openai.OpenAI, control: httpx.Client) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "gpt-4o-mini" in ids and "fake-model" in ids


def test_anthropic_non_stream(claude: anthropic.Anthropic, control: httpx.Client) -> None:
    message = claude_create(claude)
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.model == "fake-claude"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", WORDS8)]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    # 1 message + "hello there" (2) + system "Be brief." (2) = 5
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 8)
    assert message.usage.cache_read_input_tokens == 0


def test_anthropic_stream(claude: anthropic.Anthropic, control: httpx.Client) -> None:
    with claude.messages.stream(
        model="fake-claude", max_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["word0", " word1", " word2", " word3", " word4"]
    assert final.content[0].type == "text"
    assert final.content[0].text == "word0 word1 word2 word3 word4"
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)


def test_anthropic_tool_use_stream(claude: anthropic.Anthropic, control: httpx.Client) -> None:
    with claude.messages.stream(
        model="m", max_tokens=100, tools=[CLAUDE_TOOL],
        messages=[{"role": "user", "content": "look it up"}],
    ) as stream:
        partials = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert len(partials) > 2
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "lookup"
    assert block.input == {"input": WORDS8}
    assert final.stop_reason == "tool_use"


def test_anthropic_requires_headers_and_max_tokens(base_url: str, control: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    version = {"anthropic-version": "2023-06-01"}
    no_max_tokens = {k: v for k, v in body.items() if k != "max_tokens"}
    cases = [
        (version, body, 401, "authentication_error"),
        ({"x-api-key": "k"}, body, 400, "invalid_request_error"),
        ({"x-api-key": "k", **version}, no_max_tokens, 400, "invalid_request_error"),
    ]
    ok = control.post("/v1/messages", headers={"x-api-key": "k", **version}, json=body)
    assert ok.status_code == 200 and ok.json()["usage"]["output_tokens"] == 5
    for headers, payload, status, error_type in cases:
        response = control.post(f"{base_url}/v1/messages", headers=headers, json=payload)
        assert response.status_code == status
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == error_type


def test_status_faults_in_each_format(
    oai: openai.OpenAI, claude: anthropic.Anthropic, control: httpx.Client
) -> None:
    queue(control, {"kind": "status", "status": 500}, {"kind": "status", "status": 529})
    with pytest.raises(openai.InternalServerError) as oai_error:
        oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES)
    assert oai_error.value.response.json()["error"]["type"] == "server_error"
    with pytest.raises(anthropic.APIStatusError) as claude_error:
        claude_create(claude)
    assert claude_error.value.status_code == 529
    assert claude_error.value.response.json()["error"]["type"] == "overloaded_error"
    # The FIFO is empty again: the next request succeeds.
    assert oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES).choices


def test_rate_limit_fault_sets_retry_after(oai: openai.OpenAI, control: httpx.Client) -> None:
    queue(control, {"kind": "status", "status": 429, "retry_after": 1})
    with pytest.raises(openai.RateLimitError) as error:
        oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES)
    assert error.value.response.headers["retry-after"] == "1"
    assert error.value.response.json()["error"]["code"] == "rate_limit_exceeded"


def test_drop_after_cuts_stream(oai: openai.OpenAI, control: httpx.Client) -> None:
    queue(control, {"kind": "drop_after", "chunks": 3})
    received: list[openai.types.chat.ChatCompletionChunk] = []
    stream = oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES, stream=True)
    with stream, pytest.raises((httpx.HTTPError, openai.APIError)):
        received.extend(stream)
    assert [c.choices[0].delta.content for c in received] == ["", "word0", " word1"]


def test_drop_after_without_stream_closes_connection(
    oai: openai.OpenAI, control: httpx.Client
) -> None:
    queue(control, {"kind": "drop_after", "chunks": 0})
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES)


def test_hang_until_client_gives_up(oai: openai.OpenAI, control: httpx.Client) -> None:
    queue(control, {"kind": "hang"})
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.3).chat.completions.create(model="m", messages=OPENAI_MESSAGES)
    [event] = wait_for(lambda: events(control), deadline_s=1.0)
    assert event["event"] == "client_disconnected" and event["chunks_sent"] == 0


def test_delay_fault_and_latency_knob(oai: openai.OpenAI, control: httpx.Client) -> None:
    control.post("/_control/config", json={"latency_ms": 100}).raise_for_status()
    queue(control, {"kind": "delay", "ms": 200})
    for expected_s in (0.3, 0.1):
        started = time.monotonic()
        oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES)
        assert expected_s <= time.monotonic() - started < expected_s + 0.5


def test_requests_are_recorded(
    oai: openai.OpenAI, claude: anthropic.Anthropic, control: httpx.Client
) -> None:
    before = time.time()
    oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES, user="alice")
    claude_create(claude)
    first, second = control.get("/_control/requests").json()
    assert (first["method"], first["path"]) == ("POST", "/v1/chat/completions")
    assert first["headers"]["authorization"] == "Bearer x"
    assert first["body"] == {"model": "m", "messages": OPENAI_MESSAGES, "user": "alice"}
    assert before <= first["at"] <= second["at"] <= time.time()
    assert second["path"] == "/v1/messages" and second["headers"]["authorization"] == "Bearer x"
    assert second["body"]["max_tokens"] == 100


def test_client_disconnect_mid_stream_is_recorded(base_url: str, control: httpx.Client) -> None:
    control.post("/_control/config", json={"chunk_interval_ms": 100}).raise_for_status()
    body = {"model": "m", "messages": OPENAI_MESSAGES, "stream": True}
    with control.stream("POST", "/v1/chat/completions", json=body) as response:
        data: list[str] = []
        for line in response.iter_lines():
            data += [line] if line.startswith("data:") else []
            if len(data) == 2:
                closed_at = time.time()
                break
    [event] = wait_for(lambda: events(control), deadline_s=1.0)
    assert event["path"] == "/v1/chat/completions"
    assert 2 <= event["chunks_sent"] <= 3
    assert closed_at <= event["at"] < closed_at + 1.0


def test_config_and_reset(oai: openai.OpenAI, control: httpx.Client) -> None:
    assert control.post("/_control/config", json={"chunks": 3}).json()["chunks"] == 3
    assert control.post("/_control/config", json={"nope": 1}).status_code == 400
    assert control.post("/_control/faults", json={"faults": [{"kind": "x"}]}).status_code == 400
    reply = oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES)
    assert reply.choices[0].message.content == "word0 word1 word2"
    queue(control, {"kind": "status", "status": 500})
    control.post("/_control/reset").raise_for_status()
    reply = oai.chat.completions.create(model="m", messages=OPENAI_MESSAGES)
    assert reply.choices[0].message.content == WORDS8
    assert len(control.get("/_control/requests").json()) == 1


def test_cli_flags_are_the_defaults_reset_restores() -> None:
    with fake_upstream_process(chunks=3, latency_ms=1) as fake:
        assert fake.control("config", {"chunks": 5})["chunks"] == 5
        fake.reset()
        with httpx.Client(base_url=fake.url) as client:
            config = client.get("/_control/config").json()
            reply = client.post("/v1/chat/completions",
                                json={"model": "m", "messages": OPENAI_MESSAGES}).json()
    assert config == {"latency_ms": 1, "ttft_ms": 0, "chunk_interval_ms": 0, "chunks": 3}
    assert reply["choices"][0]["message"]["content"] == "word0 word1 word2"
