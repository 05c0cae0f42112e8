"""OpenAI <-> Anthropic translation, rule by rule (pure functions, no I/O).

Fixtures are checked against the `anthropic` SDK's types and translated output against the
`openai` SDK's types (and, for streams, its own SSE decoder), so both sides are the real shapes.
"""

from __future__ import annotations

import copy
import json
import random
from functools import partial
from typing import Any

import httpx2
import openai
import pytest
from anthropic.types import Message, MessageCreateParams, RawMessageStreamEvent
from llm_gateway.domain import Target
from llm_gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from llm_gateway.providers.anthropic import AnthropicProvider, AnthropicStream
from llm_gateway.providers.sse import ChunkEncoder, FrameSplitter, data_json, frame_data
from llm_gateway.tokens import OutputTally, count_text_tokens
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

TARGET = Target("anthropic", "https://anthropic.local/", "claude-x", api_key="sk-ant")
PROVIDER = AnthropicProvider(default_max_tokens=1024)
CL100K = partial(OutputTally, "cl100k_base")  # the counting function the pipeline gives
USER = {"role": "user", "content": "x"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
_CREATE_PARAMS = TypeAdapter(MessageCreateParams)
_EVENT = TypeAdapter(RawMessageStreamEvent)


def translate(body: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
    """build_request, checking what every request must satisfy on the way."""
    before = copy.deepcopy(body)
    req = PROVIDER.build_request(TARGET, body, b"", stream=stream, api_key="sk-ant")
    assert body == before, "translation must not mutate the client's body"
    assert req.url == "https://anthropic.local/v1/messages"
    assert req.headers["x-api-key"] == "sk-ant"
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["content-type"] == "application/json"
    out: dict[str, Any] = json.loads(req.body)
    _CREATE_PARAMS.validate_python(out)
    return out


def invalid(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        PROVIDER.build_request(TARGET, body, b"", stream=False, api_key="k")
    return err.value


def test_minimal_request_and_headers() -> None:
    out = translate({"model": "client-name", "messages": [USER]})
    assert out == {"model": "claude-x", "max_tokens": 1024,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    req = PROVIDER.build_request(TARGET, {"messages": [USER]}, b"", stream=False, api_key=None)
    assert "x-api-key" not in req.headers


def test_system_and_developer_join_into_system() -> None:
    out = translate({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."},
                                          {"type": "text", "text": "No emoji."}]},
        USER,
        {"role": "system", "content": "Late rule."},
    ]})
    assert out["system"] == "Be brief.\n\nUse French.\nNo emoji.\n\nLate rule."
    assert [m["role"] for m in out["messages"]] == ["user"]


def test_consecutive_same_role_messages_merge() -> None:
    out = translate({"messages": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
        {"role": "user", "content": ""},  # empty: dropped, not an empty text block
        {"role": "user", "content": "three"},
    ]})
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]},
        {"role": "user", "content": [{"type": "text", "text": "three"}]},
    ]


def test_max_tokens_sources_and_default() -> None:
    base = {"messages": [USER]}
    assert translate(base)["max_tokens"] == 1024
    assert AnthropicProvider().default_max_tokens == 4096
    assert translate({**base, "max_tokens": 9})["max_tokens"] == 9
    assert translate({**base, "max_completion_tokens": 7, "max_tokens": 9})["max_tokens"] == 7
    for bad in (0, -1, "10", True, 1.5):
        assert invalid({**base, "max_tokens": bad}).param == "max_tokens"


def test_sampling_stop_stream_user_and_dropped_fields() -> None:
    body = {"messages": [USER], "temperature": 0.2, "top_p": 0.9, "stop": "END",
            "user": "u-1", "stream": True, "stream_options": {"include_usage": True},
            "n": 1, "seed": 3, "logprobs": False, "presence_penalty": 0.1,
            "frequency_penalty": 0.1, "logit_bias": {"50256": -100},
            "response_format": {"type": "text"}, "metadata": {"a": "b"}, "store": False}
    out = translate(body, stream=True)
    assert set(out) == {"model", "messages", "max_tokens", "temperature", "top_p",
                        "stop_sequences", "stream", "metadata"}
    assert (out["temperature"], out["top_p"], out["stream"]) == (0.2, 0.9, True)
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-1"}
    assert "stream" not in translate(body, stream=False)  # the caller decides, not the body
    assert translate({"messages": [USER], "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]
    assert "stop_sequences" not in translate({"messages": [USER], "stop": None})
    assert invalid({"messages": [USER], "stop": [1]}).param == "stop"


def test_tools_translate_to_input_schema() -> None:
    out = translate({"messages": [USER], "tools": [
        WEATHER_TOOL, {"type": "function", "function": {"name": "now"}}]})
    assert out["tools"] == [
        {"name": "get_weather", "description": "Weather in a city",
         "input_schema": WEATHER_TOOL["function"]["parameters"]},  # type: ignore[index]
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out
    assert invalid({"messages": [USER], "tools": [{"type": "custom", "custom": {}}]}
                   ).param == "tools[0]"


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None,
     {"type": "tool", "name": "get_weather"}),
    ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "get_weather"}}, False,
     {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
    (None, True, None),
    (None, None, None),
])
def test_tool_choice(choice: Any, parallel: Any, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"messages": [USER], "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body).get("tool_choice") == expected
    # Without tools Anthropic refuses a tool_choice, so there is none.
    assert "tool_choice" not in translate({k: v for k, v in body.items() if k != "tools"})


def test_unsupported_tool_choice() -> None:
    err = invalid({"messages": [USER], "tools": [WEATHER_TOOL],
                   "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}})
    assert err.param == "tool_choice"


def test_tool_call_history_and_results() -> None:
    out = translate({"messages": [
        {"role": "user", "content": "weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2",
         "content": [{"type": "text", "text": "rain"}]},
        {"role": "user", "content": "thanks"},
    ], "tools": [WEATHER_TOOL]})
    assert out["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]}
    assert out["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "call_2",
         "content": [{"type": "text", "text": "rain"}]},
        {"type": "text", "text": "thanks"}]}
    assert len(out["messages"]) == 3


def test_tool_results_go_before_user_text_and_empty_results_have_no_content() -> None:
    out = translate({"messages": [
        USER,
        {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "also this"},
        {"role": "tool", "tool_call_id": "c", "content": ""},
    ]})
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c"}, {"type": "text", "text": "also this"}]


def test_tool_calls_round_trip_through_a_response() -> None:
    """A tool call the client got from us comes back in history as the same tool_use block."""
    tool_use = {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
                "input": {"city": "Paris", "days": [1, 2], "unit": None}}
    content, _ = PROVIDER.parse_response(anthropic_message([tool_use], "tool_use"), "m")
    reply = json.loads(content)["choices"][0]["message"]
    out = translate({"messages": [USER, reply, {
        "role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": "ok"}]})
    assert out["messages"][1] == {"role": "assistant", "content": [tool_use]}
    assert out["messages"][2]["content"][0]["tool_use_id"] == "toolu_01A"


def test_images() -> None:
    out = translate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                            "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]})
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "what is this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


@pytest.mark.parametrize("url", ["data:image/png,notbase64", "data:;base64,AAAA",
                                 "ftp://example.com/a.png", 7])
def test_bad_image_urls(url: Any) -> None:
    err = invalid({"messages": [USER, {"role": "assistant", "content": "a"}, {
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert err.param == "messages[2].content[0].image_url.url"


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"id": "1", "type": "custom", "custom": {}}]},
     "messages[1].tool_calls[0]"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
     "messages[1].content[0].type"),
    ({"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]},
     "messages[1].content"),
    ({"role": "function", "name": "f", "content": "x"}, "messages[1].role"),
])
def test_invalid_input_names_the_param(message: dict[str, Any], param: str) -> None:
    body = {"messages": [USER, message]}
    before = copy.deepcopy(body)
    assert invalid(body).param == param
    assert body == before


def anthropic_message(content: list[dict[str, Any]], stop_reason: str | None,
                      usage: dict[str, Any] | None = None, **extra: Any) -> bytes:
    message = {"id": "msg_01XYZ", "type": "message", "role": "assistant",
               "model": "claude-x", "content": content, "stop_reason": stop_reason,
               "stop_sequence": None,
               "usage": usage or {"input_tokens": 10, "output_tokens": 5}, **extra}
    Message.model_validate(message)
    return json.dumps(message).encode()


def completion(content: bytes) -> tuple[ChatCompletion, dict[str, Any]]:
    out, usage = PROVIDER.parse_response(content, "my-model")
    data = json.loads(out)
    assert usage.reported
    return ChatCompletion.model_validate(data), data


def test_response_text_and_cache_usage() -> None:
    parsed, data = completion(anthropic_message(
        [{"type": "thinking", "thinking": "hmm", "signature": "s"},
         {"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "end_turn",
        {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 3,
         "cache_read_input_tokens": 4}))
    assert data["id"] == "chatcmpl-msg_01XYZ" and data["object"] == "chat.completion"
    assert data["model"] == "my-model" and isinstance(data["created"], int)
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Hi there",
                                             "refusal": None}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 17, "completion_tokens": 5, "total_tokens": 22,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    _, usage = PROVIDER.parse_response(anthropic_message([], "end_turn", {
        "input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 4}), "m")
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (17, 5, 4)
    assert parsed.choices[0].message.tool_calls is None


def test_response_tool_use_only() -> None:
    parsed, data = completion(anthropic_message([
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}}], "tool_use"))
    message = data["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    assert parsed.choices[0].finish_reason == "tool_calls"
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("pause_turn", "stop"), ("refusal", "content_filter"),
    ("model_context_window_exceeded", "length"), (None, "stop"),
])
def test_response_finish_reasons(stop_reason: str | None, finish: str) -> None:
    parsed, _ = completion(anthropic_message([{"type": "text", "text": "x"}], stop_reason))
    assert parsed.choices[0].finish_reason == finish


def test_response_without_id_and_bad_bodies() -> None:
    body = json.loads(anthropic_message([{"type": "text", "text": "x"}], "end_turn"))
    del body["id"]
    _, data = completion(json.dumps(body).encode())
    assert data["id"].startswith("chatcmpl-") and len(data["id"]) > len("chatcmpl-") + 8
    for bad in (b"<html>", b"[1]"):
        with pytest.raises(UpstreamError):
            PROVIDER.parse_response(bad, "m")


def sse(*events: dict[str, Any]) -> bytes:
    """Anthropic's wire format: an `event:` line naming the type, then the data."""
    for e in events:
        if e["type"] not in ("ping", "error"):  # the SDK's union leaves these two out
            _EVENT.validate_python(e)
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def block_delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


MESSAGE_START = {"type": "message_start", "message": {
    "id": "msg_9", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
    "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 2,
              "cache_read_input_tokens": 6, "output_tokens": 1}}}
TEXT_EVENTS = (
    MESSAGE_START,
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    block_delta(0, {"type": "text_delta", "text": "Hel"}),
    block_delta(0, {"type": "text_delta", "text": "lo, \"wörld\" ✓\n"}),
    {"type": "content_block_stop", "index": 0},
)
TOOL_EVENTS = (
    {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_a", "name": "lookup", "input": {}}},
    block_delta(1, {"type": "input_json_delta", "partial_json": ""}),
    block_delta(1, {"type": "input_json_delta", "partial_json": "{\"q\": \"ca"}),
    block_delta(1, {"type": "input_json_delta", "partial_json": "ts\", \"n\": 2}"}),
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_b", "name": "other", "input": {}}},
    block_delta(2, {"type": "input_json_delta", "partial_json": "{}"}),
    {"type": "content_block_stop", "index": 2},
)
END_EVENTS = (
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 42}},
    {"type": "message_stop"},
)
STREAM = sse(*TEXT_EVENTS, *TOOL_EVENTS, *END_EVENTS)


def run(pieces: list[bytes], wants_usage: bool = True) -> tuple[bytes, AnthropicStream]:
    tr = PROVIDER.stream_translator("my-model", wants_usage, CL100K)
    out = b"".join(tr.feed(p) for p in pieces) + tr.finish()
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"[DONE]") == 1
    return out, tr


def chunks(out: bytes) -> list[dict[str, Any]]:
    frames = [f for f in out.split(b"\n\n") if f]
    assert all(f.startswith(b"data: ") for f in frames)
    return [json.loads(f[6:]) for f in frames[:-1]]


def through_sdk(out: bytes) -> list[ChatCompletionChunk]:
    """Our bytes read by the openai SDK's own SSE decoder, as a client would read them."""
    response = httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"},
                               request=httpx2.Request("POST", "http://unused/chat/completions"))
    client = openai.OpenAI(api_key="unused", base_url="http://unused")
    return list(openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client))


def test_stream_text_and_tools() -> None:
    out, tr = run([STREAM])
    got = chunks(out)
    sdk = through_sdk(out)
    assert [c.model_dump(exclude_unset=True) for c in sdk] == got
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in got} == {
        ("chatcmpl-msg_9", got[0]["created"], "my-model", "chat.completion.chunk")}
    assert got[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]
    deltas = [c["choices"][0]["delta"] for c in got if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Hello, \"wörld\" ✓\n"
    calls = [call for d in deltas for call in d.get("tool_calls", ())]
    assert calls[0] == {"index": 0, "id": "toolu_a", "type": "function",
                        "function": {"name": "lookup", "arguments": ""}}
    assert calls[4] == {"index": 1, "id": "toolu_b", "type": "function",
                        "function": {"name": "other", "arguments": ""}}
    arguments: dict[int, str] = {}
    for call in calls:
        arguments[call["index"]] = arguments.get(call["index"], "") + call["function"][
            "arguments"]
    assert {i: json.loads(a) for i, a in arguments.items()} == {0: {"q": "cats", "n": 2}, 1: {}}
    assert got[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                     "finish_reason": "tool_calls"}
    assert got[-1]["choices"] == []
    assert got[-1]["usage"] == {"prompt_tokens": 20, "completion_tokens": 42,
                                "total_tokens": 62, "prompt_tokens_details": {"cached_tokens": 6}}
    usage = tr.usage()
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (20, 42, 6)
    assert usage.reported and tr.error is None


def test_stream_without_include_usage() -> None:
    out, tr = run([STREAM], wants_usage=False)
    got = chunks(out)
    assert all(c["choices"] and "usage" not in c for c in got)
    assert got[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert tr.usage().output_tokens == 42


def normalized(out: bytes) -> list[dict[str, Any]]:
    return [{**c, "created": 0} for c in chunks(out)]  # created may tick between runs


def test_stream_split_at_every_byte_offset() -> None:
    short = sse(*TEXT_EVENTS[:4], {"type": "message_delta", "delta": {
        "stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"})
    for source in (short, short.replace(b"\n", b"\r\n")):
        whole = normalized(run([source])[0])
        assert len(whole) == 4
        for at in range(1, len(source)):
            assert normalized(run([source[:at], source[at:]])[0]) == whole, at
        assert normalized(run([source[i:i + 1] for i in range(len(source))])[0]) == whole


def test_stream_random_splits() -> None:
    whole = normalized(run([STREAM])[0])
    rng = random.Random(20261126)
    for source in (STREAM, STREAM.replace(b"\n", b"\r\n"), STREAM.replace(b"\n", b"\r")):
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(source)), rng.randint(1, 40)))
            pieces = [source[a:b] for a, b in zip([0, *cuts], [*cuts, len(source)], strict=True)]
            assert normalized(run(pieces)[0]) == whole


def test_stream_usage_updated_by_cumulative_message_delta() -> None:
    out, tr = run([sse(MESSAGE_START, {"type": "message_delta", "delta": {
        "stop_reason": "max_tokens", "stop_sequence": None}, "usage": {
        "input_tokens": 30, "cache_read_input_tokens": 6, "output_tokens": 7}},
        {"type": "message_stop"})])
    assert chunks(out)[-2]["choices"][0]["finish_reason"] == "length"
    usage = tr.usage()
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (38, 7, 6)


def test_stream_error_event() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    tr = PROVIDER.stream_translator("m", True, CL100K)
    out = tr.feed(sse(*TEXT_EVENTS[:4], error))
    out += tr.feed(sse(*TEXT_EVENTS[4:], *END_EVENTS))  # never reaches the client
    out += tr.finish()
    frames = [f for f in out.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]" and len(frames) == 4
    assert json.loads(frames[-2][6:]) == {"error": {
        "message": "upstream provider (anthropic): Overloaded", "type": "service_unavailable",
        "code": "upstream_overloaded", "param": None}}
    assert isinstance(tr.error, ServiceUnavailable)
    with pytest.raises(openai.APIError, match="Overloaded"):
        through_sdk(out)
    usage = tr.usage()
    assert not usage.reported
    assert (usage.input_tokens, usage.cached_tokens) == (20, 6)
    assert tr.generated.count() == count_text_tokens("Hel", "cl100k_base")


def test_stream_cut_off_counts_what_was_generated() -> None:
    tr = PROVIDER.stream_translator("m", False, CL100K)
    tr.feed(sse(*TEXT_EVENTS, *TOOL_EVENTS[:3]))
    usage = tr.usage()
    generated = "Hello, \"wörld\" ✓\n" + "lookup" + "{\"q\": \"ca"
    assert tr.generated.count() == count_text_tokens(generated, "cl100k_base") > 0
    assert (usage.input_tokens, usage.cached_tokens, usage.reported) == (20, 6, False)


def test_stream_ended_without_message_stop() -> None:
    # The last frame also lacks its blank line: it is still read.
    out, tr = run([sse(*TEXT_EVENTS, END_EVENTS[0])[:-2]])
    got = chunks(out)
    assert got[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert got[-1]["usage"]["completion_tokens"] == 42
    out, tr = run([sse(*TEXT_EVENTS)])
    assert chunks(out)[-2]["choices"][0]["finish_reason"] == "stop"
    assert not tr.usage().reported
    for c in chunks(out):
        ChatCompletionChunk.model_validate(c)


def test_stream_that_never_started_is_an_error() -> None:
    out, tr = run([b"event: ping\ndata: {\"type\": \"ping\"}\n\n"])
    assert json.loads(out.split(b"\n\n")[0][6:])["error"]["code"] == "upstream_incomplete_stream"
    assert isinstance(tr.error, UpstreamError)
    assert tr.usage().output_tokens == 0 and tr.generated.count() == 0


def test_frame_splitter_and_data_field() -> None:
    split = FrameSplitter()
    assert split.feed(b"data: a\n") == []
    assert split.feed(b"\n: comment\n\n\n\nevent: x\r\ndata: {\"k\":") == [b"data: a",
                                                                     b": comment"]
    assert split.feed(b"1}\r") == []
    assert split.feed(b"\n\r\ndata: tail") == [b"event: x\ndata: {\"k\":1}"]
    assert split.rest() == b"data: tail" and split.rest() == b""
    assert frame_data(b"event: x\ndata: one\ndata:two") == b"one\ntwo"
    assert frame_data(b"event: ping") is None
    assert data_json(b"data: [DONE]") is None and data_json(b"data: {bad") is None
    assert data_json(b"event: e\ndata:{\"a\": 1}\nid: 3") == {"a": 1}


def test_chunk_encoder_frames_are_valid_chunks() -> None:
    enc = ChunkEncoder("m", id="chatcmpl-1", created=5)
    for frame in (enc.content("a\"b"), enc.delta({"role": "assistant"}, None),
                  enc.delta({}, "stop")):
        ChatCompletionChunk.model_validate_json(frame[6:])
    usage = json.loads(enc.usage({"prompt_tokens": 1, "completion_tokens": 2,
                                  "total_tokens": 3})[6:])
    assert usage == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                     "model": "m", "choices": [],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


@pytest.mark.parametrize(("status", "etype", "cls", "http", "code", "retryable"), [
    (400, "invalid_request_error", InvalidRequest, 400, "invalid_request", False),
    (401, "authentication_error", UpstreamError, 502, "upstream_authentication_error", True),
    (403, "permission_error", UpstreamError, 502, "upstream_authentication_error", True),
    (404, "not_found_error", UpstreamError, 502, "upstream_model_not_found", True),
    (413, "request_too_large", PayloadTooLarge, 413, "payload_too_large", False),
    (429, "rate_limit_error", RateLimited, 429, "upstream_rate_limited", True),
    (500, "api_error", UpstreamError, 502, "upstream_error", True),
    (504, "timeout_error", UpstreamTimeout, 504, "upstream_timeout", True),
    (529, "overloaded_error", ServiceUnavailable, 503, "upstream_overloaded", True),
    (500, "some_future_error", UpstreamError, 502, "upstream_error", True),
])
def test_map_error(status: int, etype: str, cls: type[GatewayError], http: int, code: str,
                   retryable: bool) -> None:
    body = json.dumps({"type": "error", "error": {"type": etype, "message": "details"},
                       "request_id": "req_1"}).encode()
    err = PROVIDER.map_error(status, body, {"retry-after": "3"})
    assert type(err) is cls
    assert (err.status, err.code, err.retryable) == (http, code, retryable)
    assert "upstream provider (anthropic)" in err.message
    if status == 429:
        assert err.headers == {"retry-after": "3"}
        assert PROVIDER.map_error(429, body, {}).headers == {}
    else:
        assert err.headers == {}


@pytest.mark.parametrize(("status", "cls", "http", "retryable"), [
    (429, RateLimited, 429, True),
    (529, ServiceUnavailable, 503, True),
    (401, UpstreamError, 502, True),
    (400, UpstreamError, 502, False),
    (502, UpstreamError, 502, True),
    (503, UpstreamError, 502, True),
    (418, UpstreamError, 502, False),
])
def test_map_error_unparseable_body_goes_by_status(status: int, cls: type[GatewayError],
                                                   http: int, retryable: bool) -> None:
    err = PROVIDER.map_error(status, b"<html>Bad Gateway</html>", {})
    assert type(err) is cls and (err.status, err.retryable) == (http, retryable)
    assert "upstream provider (anthropic)" in err.message


def test_map_error_type_wins_over_status() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    assert isinstance(PROVIDER.map_error(500, body, {}), ServiceUnavailable)
