"""OpenAI <-> Anthropic translation rules, one by one (pure functions, no I/O)."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
from llm_gateway.domain import Target
from llm_gateway.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from llm_gateway.providers.anthropic import AnthropicProvider, to_chat_completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

TARGET = Target("anthropic", "http://anthropic.local", "claude-x", api_key="sk-ant")
PROVIDER = AnthropicProvider(default_max_tokens=1024)


def translate(body: dict[str, Any]) -> dict[str, Any]:
    before = copy.deepcopy(body)
    req = PROVIDER.build_request(TARGET, body, b"", stream=bool(body.get("stream")),
                                 api_key="sk-ant")
    assert body == before, "translation must not mutate the client's body"
    assert req.url == "http://anthropic.local/v1/messages"
    assert req.headers["x-api-key"] == "sk-ant"
    assert req.headers["anthropic-version"] == "2023-06-01"
    return json.loads(req.body)  # type: ignore[no-any-return]


def test_system_developer_and_merging() -> None:
    out = translate({"model": "c", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "ok"},
    ], "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "stop": "END", "user": "u-1"})
    assert out["model"] == "claude-x"
    assert out["system"] == "Be brief.\n\nUse French."
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ]
    assert out["max_tokens"] == 50 and out["temperature"] == 0.2 and out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-1"}


def test_max_tokens_sources() -> None:
    base = {"model": "c", "messages": [{"role": "user", "content": "x"}]}
    assert translate(base)["max_tokens"] == 1024
    assert translate({**base, "max_completion_tokens": 7, "max_tokens": 9})["max_tokens"] == 7
    assert translate({**base, "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]


def test_tools_calls_results_and_choice() -> None:
    out = translate({"model": "c", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ], "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False})
    assert out["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]}
    assert out["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "text", "text": "thanks"}]}
    assert out["tools"] == [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    assert out["tool_choice"] == {"type": "tool", "name": "get_weather",
                                  "disable_parallel_tool_use": True}
    base = {"model": "c", "messages": [{"role": "user", "content": "x"}]}
    assert translate({**base, "tool_choice": "auto"})["tool_choice"] == {"type": "auto"}
    assert translate({**base, "tool_choice": "required"})["tool_choice"] == {"type": "any"}
    assert translate({**base, "tool_choice": "none"})["tool_choice"] == {"type": "none"}


def test_images() -> None:
    out = translate({"model": "c", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]})
    assert out["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


def test_invalid_input() -> None:
    with pytest.raises(InvalidRequest) as bad:
        translate({"model": "c", "messages": [{"role": "assistant", "tool_calls": [
            {"id": "1", "function": {"name": "f", "arguments": "{not json"}}]}]})
    assert bad.value.param == "messages[0].tool_calls[0].function.arguments"
    with pytest.raises(InvalidRequest):
        translate({"model": "c", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]})


@pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("stop_sequence", "stop"),
                                              ("max_tokens", "length"),
                                              ("tool_use", "tool_calls")])
def test_response(stop: str, finish: str) -> None:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
               "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
               "stop_reason": stop, "usage": {"input_tokens": 10, "output_tokens": 5,
                                              "cache_creation_input_tokens": 3,
                                              "cache_read_input_tokens": 4}}
    if stop == "tool_use":
        message["content"].append({"type": "tool_use", "id": "tu_1", "name": "f",
                                   "input": {"a": 1}})
    completion, usage = to_chat_completion(message, "my-model")
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.model == "my-model" and parsed.id == "chatcmpl-msg_1"
    assert parsed.choices[0].message.content == "Hi there"
    assert parsed.choices[0].finish_reason == finish
    assert parsed.usage is not None and parsed.usage.prompt_tokens == 17
    assert parsed.usage.completion_tokens == 5 and parsed.usage.total_tokens == 22
    assert parsed.usage.prompt_tokens_details.cached_tokens == 4  # type: ignore[union-attr]
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (17, 5, 4)
    if stop == "tool_use":
        call = parsed.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "f" and json.loads(call.function.arguments) == {"a": 1}


STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_9",'
    b'"usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
    b'event: ping\ndata: {"type":"ping"}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hel"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"lo"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
    b'"content_block":{"type":"tool_use","id":"tu_1","name":"lookup","input":{}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"{\\"q\\": "}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"\\"cats\\"}"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use"},'
    b'"usage":{"output_tokens":9}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def run_stream(pieces: list[bytes], wants_usage: bool) -> list[dict[str, Any]]:
    tr = PROVIDER.stream_translator("my-model", wants_usage, "cl100k_base")
    out = b"".join(tr.feed(p) for p in pieces) + tr.finish()
    frames = [f for f in out.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    return [json.loads(f[6:]) for f in frames[:-1]]


def test_stream_translation_and_any_split() -> None:
    whole = run_stream([STREAM], wants_usage=True)
    for c in whole:
        ChatCompletionChunk.model_validate(c)
    assert len({c["id"] for c in whole}) == 1
    assert whole[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in whole if c["choices"])
    assert text == "Hello"
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in whole
             if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "tu_1" and calls[0]["function"]["name"] == "lookup"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"q": "cats"}
    assert {c["index"] for c in calls} == {0}
    assert whole[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert whole[-1]["choices"] == [] and whole[-1]["usage"]["completion_tokens"] == 9
    assert whole[-1]["usage"]["prompt_tokens"] == 12

    rng = random.Random(7)
    crlf = STREAM.replace(b"\n", b"\r\n")
    for source in (STREAM, crlf):
        for _ in range(60):
            cuts = sorted(rng.sample(range(1, len(source)), 12))
            pieces = [source[a:b] for a, b in zip([0, *cuts], [*cuts, len(source)], strict=True)]
            got = run_stream(pieces, wants_usage=True)
            assert [c["choices"] for c in got] == [c["choices"] for c in whole]
    assert run_stream([STREAM[:i] for i in (len(STREAM),)], False)[-1]["choices"][0][
        "finish_reason"] == "tool_calls"
    assert all(c["choices"] for c in run_stream([STREAM], wants_usage=False))


def test_stream_error_and_cut_off_usage() -> None:
    tr = PROVIDER.stream_translator("m", False, "cl100k_base")
    out = tr.feed(STREAM.split(b"event: content_block_stop")[0])
    out += tr.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                   b'"message":"Overloaded"}}\n\n')
    assert b'"code":"upstream_overloaded"' in out
    usage = tr.usage()
    assert usage.input_tokens == 12 and usage.output_tokens == 1  # "Hello" counted locally


@pytest.mark.parametrize(("status", "etype", "cls", "http"), [
    (400, "invalid_request_error", InvalidRequest, 400),
    (401, "authentication_error", UpstreamError, 502),
    (403, "permission_error", UpstreamError, 502),
    (404, "not_found_error", NotFound, 404),
    (429, "rate_limit_error", RateLimited, 429),
    (500, "api_error", UpstreamError, 502),
    (529, "overloaded_error", ServiceUnavailable, 503),
])
def test_error_mapping(status: int, etype: str, cls: type, http: int) -> None:
    body = json.dumps({"type": "error", "error": {"type": etype, "message": "m"}}).encode()
    err = PROVIDER.map_error(status, body, {"retry-after": "3"})
    assert isinstance(err, cls) and err.status == http
    if status == 429:
        assert err.headers == {"retry-after": "3"} and err.retryable
    assert err.retryable == (status in (429, 500, 529))
