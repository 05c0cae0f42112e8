"""Anthropic Messages (client) <-> OpenAI Chat Completions (upstream), rule by rule.

Client bodies are checked against the `anthropic` SDK's request types and translated requests
against the `openai` SDK's; translated replies and every stream event are validated against the
`anthropic` SDK's models (no unknown fields), and streams are also read by the SDK's own client
(its SSE decoder and its `MessageStream` accumulator), as Claude Code's SDK would read them.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message, MessageCreateParams, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from llm_gateway.errors import (
    AuthenticationFailed,
    Conflict,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from llm_gateway.messages_request import (
    anthropic_error_body,
    anthropic_error_event,
    count_message_tokens,
)
from llm_gateway.providers.anthropic_to_openai import (
    ChatToMessagesStream,
    to_anthropic_message,
    to_chat_request,
)
from llm_gateway.providers.openai import STREAM_ERROR_MESSAGE
from llm_gateway.providers.sse import MAX_FRAME_BYTES
from llm_gateway.tokens import IMAGE_TOKENS_HIGH, OutputTally, count_text_tokens
from openai.types.chat import ChatCompletion, ChatCompletionChunk, CompletionCreateParams
from pydantic import BaseModel, TypeAdapter

FIXTURES = Path(__file__).parent / "fixtures"
_CLIENT_PARAMS = TypeAdapter(MessageCreateParams)
_UPSTREAM_PARAMS = TypeAdapter(CompletionCreateParams)
_EVENT = TypeAdapter(RawMessageStreamEvent)
USER = {"role": "user", "content": "hi"}
WEATHER: Any = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


def materialized(value: Any) -> Any:
    """A validated TypedDict with its lazy iterables read (reading validates each item)."""
    if isinstance(value, dict):
        return {k: materialized(v) for k, v in value.items()}
    if isinstance(value, list | tuple | Iterator):
        return [materialized(v) for v in value]
    return value


# The installed SDK's MessageCreateParams no longer declares these, but older SDKs and Claude
# Code still send them, and Chat Completions has them: they are checked by hand.
LEGACY_SAMPLING = ("temperature", "top_p", "top_k")


def same_after_validation(adapter: TypeAdapter[Any], data: dict[str, Any]) -> None:
    """`data` is valid and the SDK's types know every key in it (an unknown key is dropped by
    validation, so the validated copy would differ)."""
    if adapter is _CLIENT_PARAMS:
        data = {k: v for k, v in data.items() if k not in LEGACY_SAMPLING}
    else:  # top_k goes to self-hosted servers only, as their extension
        data = {k: v for k, v in data.items() if k != "top_k"}
    assert materialized(adapter.validate_python(data)) == data


def no_extra(obj: Any) -> None:
    """Every field of a validated SDK model is one the SDK declares."""
    if isinstance(obj, BaseModel):
        assert not obj.model_extra, (type(obj).__name__, obj.model_extra)
        for name in type(obj).model_fields:
            no_extra(getattr(obj, name))
    elif isinstance(obj, list):
        for item in obj:
            no_extra(item)


def strict_message(data: dict[str, Any]) -> Message:
    message = Message.model_validate(data)
    no_extra(message)
    return message


def translate(body: dict[str, Any], *, stream: bool = False, provider: str = "openai",
              valid_client_body: bool = True) -> dict[str, Any]:
    """to_chat_request, checking what every translation must satisfy on the way."""
    body = {"model": "claude-x", "max_tokens": 100, **body}
    if valid_client_body:
        same_after_validation(_CLIENT_PARAMS, body)
    before = copy.deepcopy(body)
    out = to_chat_request(body, "gpt-up", stream=stream, provider=provider)
    assert body == before, "translation must not mutate the client's body"
    same_after_validation(_UPSTREAM_PARAMS, out)
    assert out["model"] == "gpt-up"
    return out


def invalid(body: dict[str, Any]) -> InvalidRequest:
    before = copy.deepcopy(body)
    with pytest.raises(InvalidRequest) as err:
        to_chat_request(body, "gpt-up", stream=False)
    assert body == before
    assert err.value.status == 400
    return err.value


# Requests


def test_minimal_request_and_max_tokens_field() -> None:
    assert translate({"messages": [USER]}) == {
        "model": "gpt-up", "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 100}
    assert translate({"messages": [USER]}, provider="self-hosted") == {
        "model": "gpt-up", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


def test_system_string_blocks_and_cache_control() -> None:
    assert translate({"system": "Be brief.", "messages": [USER]})["messages"][0] == {
        "role": "system", "content": "Be brief."}
    out = translate({"system": [
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": ""},
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ], "messages": [USER]})
    assert out["messages"] == [{"role": "system", "content": "You are Claude Code.\n\nBe brief."},
                               {"role": "user", "content": "hi"}]
    assert "system" not in translate({"system": "", "messages": [USER]})["messages"][0]["role"]
    # The SDK's MessageParam also allows role "system" inside messages.
    out = translate({"messages": [USER, {"role": "system", "content": [
        {"type": "text", "text": "Late rule."}]}]})
    assert out["messages"][1] == {"role": "system", "content": "Late rule."}


def test_text_blocks_and_citations_dropped() -> None:
    out = translate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "one",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a", "citations": None},
                                          {"type": "text", "text": "b"}]},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": ""},
                                     {"type": "text", "text": "y"}]},
    ]})
    assert out["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]},
        {"role": "user", "content": [{"type": "text", "text": "x"},
                                     {"type": "text", "text": "y"}]},
    ]


def test_images_base64_and_url() -> None:
    out = translate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"},
         "cache_control": {"type": "ephemeral"}},
    ]}]})
    assert out["messages"][0] == {"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}


def test_tool_use_and_tool_results() -> None:
    out = translate({"messages": [
        {"role": "user", "content": "weather in Paris and Oslo?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "two calls", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris", "days": [1, 2], "unit": None}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "also, thanks"},  # out of place: still after the results
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "timeout"}, {"type": "text", "text": "retry"}]},
            {"type": "tool_result", "tool_use_id": "toolu_3", "is_error": False},
            {"type": "tool_result", "tool_use_id": "toolu_4", "is_error": True, "content": []},
        ]},
    ], "tools": [WEATHER]})
    assert out["messages"][1:] == [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {
                "name": "get_weather",
                "arguments": '{"city":"Paris","days":[1,2],"unit":null}'}},
            {"id": "toolu_2", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout\nretry"},
        {"role": "tool", "tool_call_id": "toolu_3", "content": ""},
        {"role": "tool", "tool_call_id": "toolu_4", "content": "Error"},
        {"role": "user", "content": "also, thanks"},
    ]


def test_tool_result_images_move_to_a_user_message() -> None:
    out = translate({"messages": [
        USER,
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "here"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                         "data": "/9j/4AAQ"}}]}]},
    ]})
    assert out["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "screenshot", "arguments": "{}"}}]}
    assert out["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "here"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64,/9j/4AAQ"}}]}]


def test_thinking_only_turns_and_redacted_thinking_are_dropped() -> None:
    out = translate({"messages": [
        USER,
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "redacted_thinking", "data": "opaque"}]},
        {"role": "user", "content": "go on"},
    ], "thinking": {"type": "enabled", "budget_tokens": 1024}})
    assert out["messages"] == [{"role": "user", "content": "hi"},
                               {"role": "user", "content": "go on"}]
    assert "thinking" not in json.dumps(out) and "signature" not in json.dumps(out)


def test_tools_translate_to_functions() -> None:
    out = translate({"messages": [USER], "tools": [
        {**WEATHER, "cache_control": {"type": "ephemeral"}, "strict": True},
        {"name": "now", "input_schema": {"type": "object"}, "type": "custom"},
        {"name": "blank", "description": "", "input_schema": {"type": "object"}},
    ]})
    assert out["tools"] == [
        {"type": "function", "function": {"name": "get_weather",
                                          "description": "Weather in a city",
                                          "parameters": WEATHER["input_schema"]}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "blank", "parameters": {"type": "object"}}},
    ]
    assert "tool_choice" not in out and "parallel_tool_calls" not in out
    assert "tools" not in translate({"messages": [USER], "tools": []})


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True},
     {"tool_choice": "auto", "parallel_tool_calls": False}),
    ({"type": "any", "disable_parallel_tool_use": True},
     {"tool_choice": "required", "parallel_tool_calls": False}),
    ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
      "parallel_tool_calls": False}),
    ({"type": "auto", "disable_parallel_tool_use": False}, {"tool_choice": "auto"}),
])
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out = translate({"messages": [USER], "tools": [WEATHER], "tool_choice": choice})
    assert {k: out[k] for k in ("tool_choice", "parallel_tool_calls") if k in out} == expected
    # Without tools OpenAI refuses both fields, so neither is sent.
    out = translate({"messages": [USER], "tool_choice": choice})
    assert "tool_choice" not in out and "parallel_tool_calls" not in out


def test_sampling_stop_user_stream_and_dropped_fields() -> None:
    body = {"messages": [USER], "temperature": 0.2, "top_p": 0.9, "top_k": 40,
            "stop_sequences": ["END", "###"], "metadata": {"user_id": "u-1"},
            "service_tier": "auto", "stream": True}
    out = translate(body, stream=True)
    assert out == {"model": "gpt-up", "messages": [{"role": "user", "content": "hi"}],
                   "max_completion_tokens": 100, "temperature": 0.2, "top_p": 0.9,
                   "stop": ["END", "###"], "user": "u-1", "stream": True,
                   "stream_options": {"include_usage": True}}
    assert translate(body, stream=True, provider="self-hosted")["top_k"] == 40
    plain = translate(body, stream=False)  # the caller decides, not the body
    assert "stream" not in plain and "stream_options" not in plain
    assert "stop" not in translate({"messages": [USER], "stop_sequences": []})
    assert "user" not in translate({"messages": [USER], "metadata": {}})
    assert "user" not in translate({"messages": [USER], "metadata": {"user_id": None}})


def test_claude_code_session() -> None:
    body = json.loads((FIXTURES / "claude_code_session.json").read_text())
    before = copy.deepcopy(body)
    same_after_validation(_CLIENT_PARAMS, body)
    out = to_chat_request(body, "gpt-4.1", stream=True)
    assert body == before
    same_after_validation(_UPSTREAM_PARAMS, out)
    # The recorded translation the integration test replays against the fake upstream.
    assert out == json.loads((FIXTURES / "claude_code_session.openai.json").read_text())
    dumped = json.dumps(out)
    assert "cache_control" not in dumped and "signature" not in dumped
    assert "redacted_thinking" not in dumped and "budget_tokens" not in dumped
    assert (out["max_completion_tokens"], out["temperature"], out["stream"]) == (32000, 1, True)
    assert out["user"] == body["metadata"]["user_id"]
    system = [b["text"] for b in body["system"]]
    assert out["messages"][0] == {"role": "system", "content": "\n\n".join(system)}
    assert [t["function"]["name"] for t in out["tools"]] == ["Bash", "Glob", "Grep", "Read",
                                                             "Edit"]
    for tool, original in zip(out["tools"], body["tools"], strict=True):
        assert tool["function"]["parameters"] == original["input_schema"]
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "tool", "user"]
    parallel = out["messages"][2]
    history = body["messages"][1]["content"]
    assert parallel["content"] == history[1]["text"]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in parallel["tool_calls"]] == [(b["id"], b["name"], b["input"])
                                                  for b in history[2:]]
    assert [m["tool_call_id"] for m in out["messages"][3:5]] == [b["id"] for b in history[2:]]
    assert out["messages"][4]["content"].startswith("Error: F\n")  # is_error kept
    assert out["messages"][5] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_01Y4z5A6b7C8d9E0f1G2h3J4", "type": "function", "function": {
            "name": "Read", "arguments": '{"file_path":"/home/dev/shop/src/shop/checkout.py"}'}}]}
    assert out["messages"][6]["content"].startswith("     1\tdef checkout(")
    assert out["messages"][7]["content"].startswith("<system-reminder>")


@pytest.mark.parametrize(("patch", "param"), [
    ({"model": None}, "model"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": {"role": "user"}}, "messages"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                 "input": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result",
                                                      "tool_use_id": "t"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png"}}]}]}, "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "file:///etc/passwd"}}]}]},
     "messages[0].content[0].source.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "file", "file_id": "file_1"}}]}]}, "messages[0].content[0].source.type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f",
                                                      "input": {}}]}]},
     "messages[0].content[0].id"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                      "input": "{}"}]}]},
     "messages[0].content[0].input"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "document"}]}]}]},
     "messages[0].content[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "is_error": "yes"}]}]},
     "messages[0].content[0].is_error"),
    ({"messages": [{"role": "system", "content": [{"type": "image"}]}]},
     "messages[0].content[0].type"),
    ({"system": [{"type": "image"}]}, "system[0].type"),
    ({"system": 7}, "system"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": True}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stop_sequences": [1]}, "stop_sequences"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"tools": [{"input_schema": {}}]}, "tools[0].name"),
    ({"tools": [{"name": "f", "input_schema": {}, "description": 3}]}, "tools[0].description"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "required"}}, "tool_choice"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": "no"}},
     "tool_choice.disable_parallel_tool_use"),
    ({"metadata": "u"}, "metadata"),
    ({"metadata": {"user_id": 5}}, "metadata.user_id"),
])
def test_bad_client_bodies_name_the_param(patch: dict[str, Any], param: str) -> None:
    err = invalid({"model": "claude-x", "max_tokens": 10, "messages": [USER], **patch})
    assert err.param == param
    body = json.loads(anthropic_error_body(err))
    no_extra(ErrorResponse.model_validate(body))
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"{param}: ")


def test_error_messages_quote_little_of_the_client() -> None:
    err = invalid({"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "x" * 100_000}]}]})
    assert len(err.message) < 400


# Responses


def chat_completion(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
                    finish: str | None = "stop", usage: dict[str, Any] | None = None,
                    choice: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    chat: dict[str, Any] = {
        "id": "chatcmpl-r1", "object": "chat.completion", "created": 1, "model": "gpt-up",
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish, **(choice or {})}],
        "usage": usage or {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47,
                           "prompt_tokens_details": {"cached_tokens": 8}}}
    if finish in ("stop", "length", "tool_calls", "content_filter") and not choice \
            and "total_tokens" in chat["usage"]:  # else deliberately not OpenAI's shape
        ChatCompletion.model_validate(chat)
    return chat


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name,
                                                             "arguments": arguments}}


def test_response_text_and_usage() -> None:
    data, usage = to_anthropic_message(chat_completion("Hello"), "claude-x")
    message = strict_message(data)
    assert data == {"id": "msg_chatcmpl-r1", "type": "message", "role": "assistant",
                    "model": "claude-x", "content": [{"type": "text", "text": "Hello"}],
                    "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": 32, "output_tokens": 7,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8}}
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == 40
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (40, 7, 8)
    assert usage.reported and usage.generated == ()
    data, _ = to_anthropic_message(chat_completion("x"), "claude-x", message_id="msg_given")
    assert data["id"] == "msg_given"


def test_response_tool_calls() -> None:
    chat = chat_completion("Let me check.", [
        call("call_1", "get_weather", '{"city": "Paris"}'),
        call("call_2", "now", ""),
        call("call_3", "broken", '{"city": "Par'),
        call("call_4", "listy", "[1, 2]"),
    ], "tool_calls")
    before = copy.deepcopy(chat)
    data, _ = to_anthropic_message(chat, "claude-x")
    assert chat == before
    strict_message(data)
    assert data["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
        {"type": "tool_use", "id": "call_3", "name": "broken", "input": {}},
        {"type": "tool_use", "id": "call_4", "name": "listy", "input": {}}]
    assert data["stop_reason"] == "tool_use"
    # Some self-hosted servers say "stop" after tool calls.
    data, _ = to_anthropic_message(chat_completion(None, [call("c", "f", "{}")], "stop"), "m")
    assert (data["content"][0]["type"], data["stop_reason"]) == ("tool_use", "tool_use")


@pytest.mark.parametrize(("finish", "stop_reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
    ("content_filter", "refusal"), ("function_call", "tool_use"), (None, "end_turn"),
    ("something_new", "end_turn"), (7, "end_turn"),
])
def test_response_stop_reasons(finish: Any, stop_reason: str) -> None:
    data, _ = to_anthropic_message(chat_completion("x", finish=finish), "m")
    assert strict_message(data).stop_reason == stop_reason


def test_stop_sequence_only_when_the_upstream_names_one_the_request_had() -> None:
    stops = ("END", "###")
    for extra in ({"stop_reason": "END"}, {"matched_stop": "###"}):  # vLLM, SGLang
        data, _ = to_anthropic_message(chat_completion("x", choice=extra), "m",
                                       stop_sequences=stops)
        message = strict_message(data)
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence",
                                                                next(iter(extra.values())))
    cases: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({"stop_reason": "OTHER"}, stops), ({"stop_reason": "END"}, ()),
        ({"stop_reason": 128001}, stops), ({}, stops)]
    for extra, given in cases:
        data, _ = to_anthropic_message(chat_completion("x", choice=extra), "m",
                                       stop_sequences=given)
        assert (data["stop_reason"], data["stop_sequence"]) == ("end_turn", None)
    capped = chat_completion("x", finish="length", choice={"stop_reason": "END"})
    data, _ = to_anthropic_message(capped, "m", stop_sequences=stops)
    assert data["stop_reason"] == "max_tokens"


def test_refusal_and_content_parts() -> None:
    chat = chat_completion(None, finish="stop")
    chat["choices"][0]["message"]["refusal"] = "I can't help with that."
    data, _ = to_anthropic_message(chat, "m")
    assert strict_message(data).stop_reason == "refusal"
    assert data["content"] == [{"type": "text", "text": "I can't help with that."}]
    chat = chat_completion(None)
    chat["choices"][0]["message"]["content"] = [{"type": "text", "text": "a"}, {"x": 1},
                                                {"type": "text", "text": "b"}]
    assert to_anthropic_message(chat, "m")[0]["content"] == [{"type": "text", "text": "ab"}]


def test_unreported_usage_keeps_what_to_count() -> None:
    chat = chat_completion("Hello there", [call("c", "f", '{"a": 1}')], "tool_calls",
                           usage={"prompt_tokens": 1e25, "completion_tokens": 3})
    chat["choices"][0]["message"]["reasoning_content"] = "because"
    data, usage = to_anthropic_message(chat, "m", prompt_tokens=21)
    strict_message(data)
    assert data["usage"] == {"input_tokens": 21, "output_tokens": 0,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    assert not usage.reported and usage.input_tokens == 21
    assert usage.generated == ("Hello there", "f", '{"a": 1}', "because")
    del chat["usage"]
    assert not to_anthropic_message(chat, "m")[1].reported


@pytest.mark.parametrize("chat", [
    {}, {"choices": "x"}, {"choices": []}, {"choices": [5]}, {"choices": [{"message": "x"}]},
    {"choices": [{"message": {"content": 5, "tool_calls": "x"}}]},
    {"choices": [{"message": {"tool_calls": [5, {"function": "x"}, {"function": {
        "name": 5, "arguments": 7}}, {"id": 9, "function": {"name": "f", "arguments": "{}"}}]}}]},
    {"id": "x" * 10_000, "choices": [{"message": {"content": "hi"}, "finish_reason": []}],
     "usage": {"prompt_tokens": -1, "completion_tokens": "3",
               "prompt_tokens_details": {"cached_tokens": 1e25}}},
    {"id": "\n", "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                           "prompt_tokens_details": {"cached_tokens": 99}}},
])
def test_hostile_responses_never_crash(chat: dict[str, Any]) -> None:
    data, usage = to_anthropic_message(chat, "m")
    message = strict_message(data)
    assert message.id.startswith("msg_") and len(message.id) < 200
    assert message.usage.input_tokens >= 0 and usage.cached_tokens <= usage.input_tokens
    for block in message.content:
        if block.type == "tool_use":
            assert block.id and isinstance(block.input, dict)


def test_response_through_the_sdk() -> None:
    """The SDK sends a request with every translated feature; the 'upstream' checks the
    translation and answers; the SDK reads our answer."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        chat = to_chat_request(body, "gpt-up", stream=False)
        seen.append(chat)
        reply = chat_completion(None, [call("call_9", "get_weather", '{"city":"Oslo"}')],
                                "tool_calls")
        message, _ = to_anthropic_message(reply, body["model"])
        return httpx2.Response(200, json=message)

    with sdk_client(handler) as client:
        message = client.messages.create(
            model="claude-x", max_tokens=64, system="Be brief.", stop_sequences=["END"],
            tools=[WEATHER], tool_choice={"type": "any"}, metadata={"user_id": "u-7"},
            messages=[
                {"role": "user", "content": [
                    {"type": "text", "text": "weather where this is?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": "iVBORw0KGgo="}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "call_8",
                                                   "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_8",
                                              "content": "rain"}]},
            ])
    no_extra(message)
    assert message.stop_reason == "tool_use" and message.model == "claude-x"
    assert message.content[0].type == "tool_use"
    assert (message.content[0].id, message.content[0].input) == ("call_9", {"city": "Oslo"})
    chat = seen[0]
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    assert chat["messages"][1]["content"][1] == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "call_8", "content": "rain"}
    assert (chat["stop"], chat["tool_choice"], chat["user"], chat["max_completion_tokens"]) == (
        ["END"], "required", "u-7", 64)


def sdk_client(handler: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-tenant", base_url="http://gateway.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


# Streams


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, Any] | None = None, **choice_extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "chatcmpl-s1", "object": "chat.completion.chunk",
                            "created": 1, "model": "gpt-up", "choices": []}
    if delta is not None:
        data["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish, **choice_extra}]
    if usage is not None:
        data["usage"] = usage
    return data


def openai_sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    out = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


USAGE = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52,
         "prompt_tokens_details": {"cached_tokens": 8}}
ROLE = chunk({"role": "assistant", "content": ""})
END = (chunk({}, "stop"), chunk(usage=USAGE))
TOOL_END = (chunk({}, "tool_calls"), chunk(usage=USAGE))


def tool_start(index: int, call_id: str, name: str) -> dict[str, Any]:
    return chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": ""}}]})


def tool_args(index: int, arguments: str) -> dict[str, Any]:
    return chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})


TEXT = ["Hel", "lo, \"wörld\" ✓\n"]
STREAMS = {
    "text": (openai_sse(ROLE, *(chunk({"content": t}) for t in TEXT), *END),
             chat_completion("".join(TEXT), usage=USAGE)),
    "one_tool": (openai_sse(chunk({"role": "assistant", "content": None}),
                            tool_start(0, "call_a", "get_weather"), tool_args(0, '{"ci'),
                            tool_args(0, 'ty": "Paris"}'), *TOOL_END),
                 chat_completion(None, [call("call_a", "get_weather", '{"city": "Paris"}')],
                                 "tool_calls", USAGE)),
    "parallel_tools": (openai_sse(ROLE, tool_start(0, "call_a", "get_weather"),
                                  tool_args(0, '{"city": "Paris"}'),
                                  tool_start(1, "call_b", "get_weather"),
                                  tool_args(1, '{"city":'), tool_args(1, ' "Oslo"}'),
                                  tool_start(2, "call_c", "now"), *TOOL_END),
                       chat_completion(None, [call("call_a", "get_weather", '{"city": "Paris"}'),
                                              call("call_b", "get_weather", '{"city": "Oslo"}'),
                                              call("call_c", "now", "")], "tool_calls", USAGE)),
    "text_then_tool": (openai_sse(ROLE, *(chunk({"content": t}) for t in TEXT),
                                  tool_start(0, "call_a", "get_weather"),
                                  tool_args(0, '{"city": "Paris"}'), *TOOL_END),
                       chat_completion("".join(TEXT), [call("call_a", "get_weather",
                                                            '{"city": "Paris"}')],
                                       "tool_calls", USAGE)),
}


def run(pieces: list[bytes], prompt_tokens: int = 31, **kw: Any
        ) -> tuple[bytes, ChatToMessagesStream]:
    tr = ChatToMessagesStream("claude-x", prompt_tokens, partial(OutputTally, "cl100k_base"),
                              **kw)
    out = b"".join(tr.feed(p) for p in pieces) + tr.finish()
    assert tr.finish() == b"" and tr.feed(b"data: {}\n\n") == b""  # ended stays ended
    return out, tr


def events(out: bytes) -> list[dict[str, Any]]:
    """Each event parsed, its `event:` name checked against its type, and validated."""
    parsed = []
    for frame in out.split(b"\n\n")[:-1]:
        name_line, data_line = frame.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        data = json.loads(data_line[6:])
        assert name_line[7:].decode() == data["type"]
        model = ErrorResponse.model_validate(data) if data["type"] == "error" \
            else _EVENT.validate_python(data)
        no_extra(model)
        parsed.append(data)
    assert out.endswith(b"\n\n") or not out
    return parsed


def check_order(evs: list[dict[str, Any]]) -> None:
    """message_start, then whole blocks one at a time (numbered from 0, deltas of the block's
    own kind), then message_delta and message_stop; or an error event that ends it."""
    assert evs[0]["type"] in ("message_start", "error")
    open_block: dict[str, Any] | None = None
    next_index = 0
    for i, e in enumerate(evs[1:], 1):
        kind = e["type"]
        if kind == "error":
            assert i == len(evs) - 1
        elif kind == "content_block_start":
            assert open_block is None and e["index"] == next_index
            open_block, next_index = e["content_block"], next_index + 1
        elif kind == "content_block_delta":
            assert open_block is not None and e["index"] == next_index - 1
            expected = "text_delta" if open_block["type"] == "text" else "input_json_delta"
            assert e["delta"]["type"] == expected
        elif kind == "content_block_stop":
            assert open_block is not None and e["index"] == next_index - 1
            open_block = None
        elif kind == "message_delta":
            assert open_block is None and evs[i + 1]["type"] == "message_stop"
        else:
            assert kind == "message_stop" and i == len(evs) - 1


def sdk_final_message(out: bytes) -> Message:
    """Our bytes read by the SDK's own stream helper (SSE decoder and accumulator)."""
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})

    with sdk_client(handler) as client, client.messages.stream(
            model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        return stream.get_final_message()


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_matches_the_non_stream_translation(name: str) -> None:
    source, completion = STREAMS[name]
    out, tr = run([source])
    evs = events(out)
    check_order(evs)
    assert evs[0]["message"]["usage"] == {"input_tokens": 31, "output_tokens": 0,
                                          "cache_creation_input_tokens": 0,
                                          "cache_read_input_tokens": 0}
    assert evs[-2]["usage"] == {"input_tokens": 32, "output_tokens": 12,
                                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8}
    final = sdk_final_message(out)
    expected, usage = to_anthropic_message(completion, "claude-x",
                                           message_id=evs[0]["message"]["id"])
    assert final.model_dump(exclude_none=True) == Message.model_validate(expected).model_dump(
        exclude_none=True)
    assert tr.error is None
    streamed = tr.usage()
    assert (streamed.input_tokens, streamed.output_tokens, streamed.cached_tokens,
            streamed.reported) == (usage.input_tokens, usage.output_tokens, usage.cached_tokens,
                                   True) == (40, 12, 8, True)


def test_stream_events_exactly() -> None:
    out, _ = run([STREAMS["text_then_tool"][0]])
    evs = events(out)
    assert [e["type"] for e in evs] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert evs[0]["message"] == {"id": "msg_chatcmpl-s1", "type": "message",
                                 "role": "assistant", "model": "claude-x", "content": [],
                                 "stop_reason": None, "stop_sequence": None,
                                 "usage": evs[0]["message"]["usage"]}
    assert evs[1] == {"type": "content_block_start", "index": 0,
                      "content_block": {"type": "text", "text": ""}}
    assert evs[2]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert evs[5] == {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}}
    assert evs[6] == {"type": "content_block_delta", "index": 1, "delta": {
        "type": "input_json_delta", "partial_json": '{"city": "Paris"}'}}
    assert evs[8]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    given, _ = run([STREAMS["text"][0]], message_id="msg_req1")
    assert events(given)[0]["message"]["id"] == "msg_req1"


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_split_at_every_point(name: str) -> None:
    source = STREAMS[name][0]
    for variant in (source, source.replace(b"\n", b"\r\n")):
        whole = run([variant])[0]
        for at in range(1, len(variant)):
            assert run([variant[:at], variant[at:]])[0] == whole, at
        assert run([variant[i:i + 1] for i in range(len(variant))])[0] == whole


def test_stream_random_splits() -> None:
    source = STREAMS["parallel_tools"][0]
    whole = run([source])[0]
    rng = random.Random(20260302)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(source)), rng.randint(1, 40)))
        pieces = [source[a:b] for a, b in zip([0, *cuts], [*cuts, len(source)], strict=True)]
        assert run(pieces)[0] == whole


def test_stream_stop_sequence() -> None:
    source = openai_sse(ROLE, chunk({"content": "a"}), chunk({}, "stop", stop_reason="END"),
                        chunk(usage=USAGE))
    out, _ = run([source], stop_sequences=["END"])
    assert events(out)[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert sdk_final_message(out).stop_sequence == "END"
    out, _ = run([source])
    assert events(out)[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_stream_refusal() -> None:
    out, _ = run([openai_sse(ROLE, chunk({"refusal": "I can't "}), chunk({"refusal": "help."}),
                             *END)])
    final = sdk_final_message(out)
    chat = chat_completion(None, usage=USAGE)
    chat["choices"][0]["message"]["refusal"] = "I can't help."
    expected, _ = to_anthropic_message(chat, "claude-x", message_id=final.id)
    assert final.model_dump(exclude_none=True) == Message.model_validate(expected).model_dump(
        exclude_none=True)
    assert final.stop_reason == "refusal"


def test_stream_max_tokens_and_usage_in_the_finish_chunk() -> None:
    out, tr = run([openai_sse(ROLE, chunk({"content": "a"}), chunk({}, "length", usage={
        "prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}))])
    assert events(out)[-2] == {"type": "message_delta",
                               "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                               "usage": {"input_tokens": 5, "output_tokens": 1,
                                         "cache_creation_input_tokens": 0,
                                         "cache_read_input_tokens": 0}}
    assert tr.usage().reported


def test_stream_without_usage_counts_what_was_generated() -> None:
    source = openai_sse(ROLE, chunk({"content": "Hello there"}), tool_start(0, "c", "lookup"),
                        tool_args(0, '{"q": "cats"}'), chunk({}, "tool_calls"))
    out, tr = run([source], prompt_tokens=17)
    evs = events(out)
    expected = count_text_tokens("Hello there" + "lookup" + '{"q": "cats"}', "cl100k_base")
    assert evs[-2]["usage"] == {"output_tokens": expected}
    final = sdk_final_message(out)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (17, expected)
    usage = tr.usage()
    assert (usage.input_tokens, usage.output_tokens, usage.reported) == (17, 0, False)
    assert tr.generated.count() == expected  # what finish() will count: the same, once


def test_stream_without_done_ends_on_finish_reason() -> None:
    out, tr = run([openai_sse(ROLE, chunk({"content": "a"}), *END, done=False)[:-2]])
    evs = events(out)
    check_order(evs)
    assert evs[-1] == {"type": "message_stop"} and tr.error is None


def test_stream_done_without_finish_reason_is_end_turn() -> None:
    out, tr = run([openai_sse(ROLE, chunk({"content": "a"}))])
    assert events(out)[-2]["delta"]["stop_reason"] == "end_turn" and tr.error is None


def error_event(out: bytes) -> dict[str, Any]:
    last = events(out)[-1]
    assert last["type"] == "error"
    return last


def test_stream_upstream_error_frame() -> None:
    tr = ChatToMessagesStream("claude-x", 9, partial(OutputTally, "cl100k_base"))
    out = tr.feed(openai_sse(ROLE, chunk({"content": "Hel"}), done=False))
    out += tr.feed(b'data: {"error": {"message": "db password is hunter2", "type": "x"}}\n\n')
    out += tr.feed(openai_sse(chunk({"content": "lo"}), *END))  # never reaches the client
    out += tr.finish()
    evs = events(out)
    check_order(evs)
    assert [e["type"] for e in evs] == ["message_start", "content_block_start",
                                        "content_block_delta", "error"]
    assert evs[-1] == {"type": "error", "error": {"type": "api_error",
                                                  "message": STREAM_ERROR_MESSAGE}}
    assert b"hunter2" not in out
    assert isinstance(tr.error, UpstreamError) and tr.error.status == 502
    with pytest.raises(anthropic.APIStatusError):
        sdk_final_message(out)
    usage = tr.usage()
    assert (usage.input_tokens, usage.reported) == (9, False)
    assert tr.generated.count() == count_text_tokens("Hel", "cl100k_base")


def test_stream_cut_before_the_end_is_an_error() -> None:
    out, tr = run([openai_sse(ROLE, chunk({"content": "Hel"}), done=False)])
    assert error_event(out)["error"]["type"] == "api_error"
    assert tr.error is not None and tr.error.code == "upstream_incomplete_stream"
    check_order(events(out))
    for nothing in (b"", b": keep-alive\n\n", b"data: [DONE]\n\n"):
        out, tr = run([nothing])
        assert [e["type"] for e in events(out)] == ["error"] and tr.error is not None


def test_stream_failures_met_by_the_relay() -> None:
    tr = ChatToMessagesStream("claude-x", 9, partial(OutputTally, "cl100k_base"))
    tr.feed(openai_sse(ROLE, done=False))
    with pytest.raises(UpstreamError) as err:  # one event larger than the bound
        tr.feed(b"data: " + b"x" * (MAX_FRAME_BYTES + 10))
    assert err.value.code == "upstream_response_too_large"
    out = tr.fail(err.value)
    assert error_event(out)["error"]["type"] == "api_error" and tr.error is err.value
    assert tr.feed(b"data: {}\n\n") == b"" and tr.finish() == b"" and tr.fail(err.value) == b""
    tr = ChatToMessagesStream("claude-x", 9, partial(OutputTally, "cl100k_base"))
    out = tr.fail(UpstreamTimeout("the upstream provider timed out"))
    assert error_event(out)["error"] == {"type": "timeout_error",
                                         "message": "the upstream provider timed out"}


def test_stream_interleaved_tool_arguments_fail() -> None:
    out, tr = run([openai_sse(ROLE, tool_start(0, "a", "f"), tool_start(1, "b", "g"),
                              tool_args(0, '{"late": 1}'), *TOOL_END)])
    assert error_event(out)["error"]["type"] == "api_error"
    assert tr.error is not None and tr.error.code == "upstream_interleaved_tool_calls"
    check_order(events(out))
    # A repeated header of a closed call (no arguments) is harmless.
    out, tr = run([openai_sse(ROLE, tool_start(0, "a", "f"), tool_start(1, "b", "g"),
                              tool_start(0, "a", "f"), *TOOL_END)])
    assert tr.error is None
    assert [c.model_dump()["id"] for c in sdk_final_message(out).content] == ["a", "b"]


def test_stream_tool_calls_without_index_or_id() -> None:
    def raw(delta: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(chunk(delta)).encode() + b"\n\n"

    source = (raw({"role": "assistant"})
              + raw({"tool_calls": [{"id": "x1", "function": {"name": "f", "arguments": "{}"}},
                                    {"id": "x2", "function": {"name": "g", "arguments": "{"}}]})
              + raw({"tool_calls": [{"function": {"arguments": "}"}}]})
              + raw({"tool_calls": [{"index": "0", "function": {"name": 5}}]})
              + openai_sse(*TOOL_END))
    out, tr = run([source])
    check_order(events(out))
    final = sdk_final_message(out)
    assert [(c.id, c.name, c.input) for c in final.content if c.type == "tool_use"] == [
        ("x1", "f", {}), ("x2", "g", {})]
    assert tr.error is None


def test_stream_arguments_that_are_not_json_pass_as_sent() -> None:
    """Arguments are streamed as they come (an Anthropic client parses them at the block's
    end); whatever they are, every event is valid and the stream ends normally."""
    out, tr = run([openai_sse(ROLE, tool_start(0, "a", "f"), tool_args(0, "{not json"),
                              tool_args(0, "\u0000\"]"), *TOOL_END)])
    evs = events(out)
    check_order(evs)
    assert [e["delta"]["partial_json"] for e in evs if e["type"] == "content_block_delta"] == [
        "{not json", "\u0000\"]"]
    assert evs[-2]["delta"]["stop_reason"] == "tool_use" and tr.error is None


def test_hostile_stream_frames_never_crash() -> None:
    frames = [b"data: [1, 2]", b'data: "x"', b"data: 5", b"data: null", b"data: {bad",
              b": comment", b"event: ping", b'data: {"choices": "x"}',
              b'data: {"choices": [5, {"index": 1, "delta": {"content": "other choice"}}]}',
              b'data: {"choices": [{"delta": "x"}]}',
              b'data: {"choices": [{"delta": {"content": 5, "tool_calls": "x"}}]}',
              b'data: {"choices": [{"delta": {"tool_calls": [5, {"index": 0}]}}]}',
              b'data: {"choices": [{"delta": {"content": "ok"}, "finish_reason": 7}]}',
              b'data: {"usage": {"prompt_tokens": 1e25, "completion_tokens": 3}, "choices": []}',
              b'data: {"id": 12, "choices": [], "usage": "x"}']
    out, tr = run([b"\n\n".join(frames) + b"\n\n"])
    evs = events(out)
    check_order(evs)
    assert evs[0]["type"] == "message_start" and evs[-1]["type"] == "message_stop"
    final = sdk_final_message(out)
    assert final.stop_reason == "tool_use"  # a tool call was opened (nameless)
    assert [b.type for b in final.content] == ["tool_use", "text"]
    assert final.content[1].text == "ok"  # type: ignore[union-attr]
    assert not tr.usage().reported


def test_stream_memory_is_bounded() -> None:
    """A long stream leaves no growing state: only the open block and a tally slice."""
    tr = ChatToMessagesStream("claude-x", 1, partial(OutputTally, "cl100k_base"))
    tr.feed(openai_sse(ROLE, done=False))
    piece = openai_sse(chunk({"content": "word " * 50}), done=False)
    for _ in range(2000):
        tr.feed(piece)
    assert len(tr._split.rest()) == 0  # nothing held between events
    assert tr.generated.count() > 2000 * 50


# Errors


@pytest.mark.parametrize(("exc", "status", "etype", "sdk_error"), [
    (InvalidRequest("bad", param="messages"), 400, "invalid_request_error",
     anthropic.BadRequestError),
    (AuthenticationFailed("no key"), 401, "authentication_error", anthropic.AuthenticationError),
    (PermissionDenied("not yours"), 403, "permission_error", anthropic.PermissionDeniedError),
    (NotFound("no route"), 404, "not_found_error", anthropic.NotFoundError),
    (MethodNotAllowed("GET"), 405, "invalid_request_error", anthropic.APIStatusError),
    (RequestTimeout("slow body"), 408, "invalid_request_error", anthropic.RequestTimeoutError),
    (Conflict("exists"), 409, "invalid_request_error", anthropic.ConflictError),
    (PayloadTooLarge("big"), 413, "invalid_request_error", anthropic.ContentTooLargeError),
    (RateLimited("slow down", headers={"retry-after": "7"}), 429, "rate_limit_error",
     anthropic.RateLimitError),
    (InternalError("oops"), 500, "api_error", anthropic.InternalServerError),
    (UpstreamError("upstream failed"), 502, "api_error", anthropic.InternalServerError),
    (ServiceUnavailable("busy"), 503, "overloaded_error", anthropic.ServiceUnavailableError),
    (UpstreamTimeout("timed out"), 504, "timeout_error", anthropic.GatewayTimeoutError),
    (GatewayError("overloaded", status=529), 529, "overloaded_error", anthropic.OverloadedError),
])
def test_error_bodies(exc: GatewayError, status: int, etype: str,
                      sdk_error: type[anthropic.APIStatusError]) -> None:
    assert exc.status == status
    body = anthropic_error_body(exc, request_id="req_1")
    data = json.loads(body)
    no_extra(ErrorResponse.model_validate(data))
    message = f"{exc.param}: {exc.message}" if exc.param else exc.message
    assert data == {"type": "error", "error": {"type": etype, "message": message},
                    "request_id": "req_1"}
    assert json.loads(anthropic_error_event(exc).split(b"\n")[1][6:])["error"]["type"] == etype

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(exc.status, content=anthropic_error_body(exc),
                               headers={"content-type": "application/json", **exc.headers})

    with sdk_client(handler) as client, pytest.raises(sdk_error) as raised:
        client.messages.create(model="m", max_tokens=1, messages=[USER])  # type: ignore[list-item]
    assert raised.value.status_code == status
    assert raised.value.body["error"]["type"] == etype  # type: ignore[index]
    if status == 429:
        assert raised.value.response.headers["retry-after"] == "7"


# Counting


def test_count_message_tokens_counts_every_part() -> None:
    def n(text: str) -> int:
        return len(text)

    body = {"model": "m", "max_tokens": 5, "system": [
        {"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "tools": [WEATHER], "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "not sent to these routes", "signature": "s"},
                {"type": "text", "text": "ok"},
                {"type": "tool_use", "id": "t", "name": "get_weather", "input": {"city": "P"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": "rain"},
                {"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "text", "text": "abc"},
                    {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"}}]},
                {"type": "image", "source": {"type": "url", "url": "https://e.com/b.png"}}]},
        ]}
    expected = (3  # reply priming
                + 3 + len("sys")
                + len(json.dumps([WEATHER], separators=(",", ":")))
                + 3 + len("user") + len("hello")
                + 3 + len("assistant") + len("ok") + len("get_weather")
                + len('{"city":"P"}')
                + 3 + len("user") + len("rain") + len("abc") + 2 * IMAGE_TOKENS_HIGH)
    assert count_message_tokens(body, n) == expected
    assert count_message_tokens({"system": "sys", "messages": "x", "tools": "y"}, n) == 3 + 3 + 3
    assert count_message_tokens({}, n) == 3


def test_count_claude_code_session_with_the_limits_tokenizer() -> None:
    body = json.loads((FIXTURES / "claude_code_session.json").read_text())
    count = count_message_tokens(body, lambda t: count_text_tokens(t, "o200k_base"))
    assert count > count_text_tokens(body["system"][1]["text"], "o200k_base") + 200
