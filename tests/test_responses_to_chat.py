"""OpenAI Responses <-> Chat Completions translation, rule by rule (pure functions, no I/O).

Client bodies are checked against the openai SDK's `ResponseCreateParams`, translated requests
against its `CompletionCreateParams`, responses and every stream event against its Responses
models with no field the SDK does not know, and streams are also read by the SDK's own
`responses.stream()` accumulator, as a client would read them.
"""

from __future__ import annotations

import copy
import json
import random
import re
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from anthropic.types import MessageCreateParams
from llm_gateway.errors import InvalidRequest, ServiceUnavailable, UpstreamError
from llm_gateway.providers.anthropic import (
    AnthropicStream,
    to_chat_completion,
    to_messages_request,
)
from llm_gateway.providers.responses_to_chat import (
    ChainedStream,
    ChatToResponsesStream,
    prompt_view,
    to_chat_request,
    to_response,
)
from llm_gateway.tokens import IMAGE_TOKENS, OutputTally, count_prompt_tokens, reservation
from openai.types.chat import ChatCompletion, ChatCompletionChunk, CompletionCreateParams
from openai.types.responses import Response, ResponseCreateParams, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from tests.test_anthropic_translation import (
    END_EVENTS,
    TEXT_EVENTS,
    TOOL_EVENTS,
    anthropic_message,
    sse,
)

_CLIENT: TypeAdapter[Any] = TypeAdapter(ResponseCreateParams)
_CHAT: TypeAdapter[Any] = TypeAdapter(CompletionCreateParams)
_ANTHROPIC: TypeAdapter[Any] = TypeAdapter(MessageCreateParams)
_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
FIXTURES = Path(__file__).parent / "fixtures"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "strict": True, "parameters": {"type": "object", "properties": {
               "city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "strict": True,
    "parameters": WEATHER["parameters"]}}

COUNT = partial(OutputTally, "cl100k_base")


def strict(model: Any, path: str = "$") -> None:
    """Every field, at every depth, is one the SDK's type declares."""
    if isinstance(model, BaseModel):
        assert not model.model_extra, f"{path}: unknown fields {sorted(model.model_extra)}"
        for name in model.model_fields_set:
            strict(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for i, value in enumerate(model):
            strict(value, f"{path}[{i}]")
    elif isinstance(model, dict):
        for key, value in model.items():
            strict(value, f"{path}.{key}")


def translate(body: dict[str, Any], target: str = "self-hosted", *,
              stream: bool = False, sdk_shape: bool = True) -> dict[str, Any]:
    if sdk_shape:
        _CLIENT.validate_python(body)
    before = copy.deepcopy(body)
    out = to_chat_request(body, "up-model", stream=stream, target_provider=target)
    assert body == before, "translation must not mutate the client's body"
    _CHAT.validate_python(out)
    return out


def invalid(body: dict[str, Any], target: str = "self-hosted") -> InvalidRequest:
    before = copy.deepcopy(body)
    with pytest.raises(InvalidRequest) as err:
        to_chat_request(body, "up", stream=False, target_provider=target)
    assert body == before
    assert err.value.status == 400
    return err.value


# -- request ------------------------------------------------------------------------------------


def test_string_input_and_instructions() -> None:
    assert translate({"model": "r", "input": "hi", "instructions": "Be brief."}) == {
        "model": "up-model", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hi"}]}
    assert translate({"model": "r", "input": "hi", "instructions": ""})["messages"] == [
        {"role": "user", "content": "hi"}]


def test_message_items_of_every_role_and_part() -> None:
    out = translate({"model": "r", "input": [
        {"role": "system", "content": "sys"},
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "dev "}, {"type": "input_text", "text": "rules"}]},
        {"role": "user", "content": [
            {"type": "input_text", "text": "what is this"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
             "detail": "low"},
            {"type": "input_image", "image_url": "https://example.com/cat.jpg",
             "detail": "auto"},
            {"type": "input_image", "image_url": "https://example.com/dog.jpg",
             "detail": "original"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "A cat", "annotations": []},
                     {"type": "output_text", "text": ".", "annotations": []}]},
        {"type": "message", "role": "assistant", "id": "msg_2", "status": "completed",
         "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "assistant", "content": "plain"},
    ]})
    assert out["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "system", "content": "dev rules"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                                "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg",
                                                "detail": "auto"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "assistant", "content": "plain"},
    ]
    dev = {"model": "r", "input": [{"role": "developer", "content": "d"}]}
    assert translate(dev, "openai")["messages"] == [{"role": "developer", "content": "d"}]
    assert translate(dev, "anthropic")["messages"] == [{"role": "system", "content": "d"}]


def test_function_calls_merge_and_outputs_become_tool_messages() -> None:
    call = {"type": "function_call", "name": "get_weather", "status": "completed"}
    out = translate({"model": "r", "input": [
        {"role": "user", "content": "Paris and Oslo?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {"role": "assistant", "content": "Checking."},
        {**call, "call_id": "c1", "arguments": "{\"city\":\"Paris\"}", "id": "fc_1"},
        {**call, "call_id": "c2", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]},
        {**call, "call_id": "c3", "arguments": ""},
        {"type": "function_call_output", "call_id": "c3", "output": ""},
        {"role": "user", "content": "thanks"},
    ]})
    tool = {"type": "function"}
    assert out["messages"] == [
        {"role": "user", "content": "Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {**tool, "id": "c1",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {**tool, "id": "c2",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {**tool, "id": "c3", "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c3", "content": ""},
        {"role": "user", "content": "thanks"},
    ]


def test_image_in_a_function_output_only_for_anthropic() -> None:
    body = {"model": "r", "input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_image", "image_url": "https://e.com/a.png"}]}]}
    assert translate(body, "anthropic")["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]
    assert invalid(body).param == "input[0].output[0].type"


def test_tools_options_and_stream() -> None:
    body = {"model": "r", "input": "hi", "tools": [WEATHER, {
        "type": "function", "name": "now", "parameters": None, "strict": False}],
        "tool_choice": "required", "parallel_tool_calls": False, "max_output_tokens": 77,
        "temperature": 0.2, "top_p": 0.9, "user": "u-1", "store": True,
        "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "low"},
        "truncation": "auto", "metadata": {"k": "v"}, "service_tier": "auto",
        "stream_options": {"include_obfuscation": False}, "text": {"verbosity": "low"}}
    out = translate(body, stream=True)
    assert out == {"model": "up-model", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [CHAT_WEATHER, {"type": "function", "function": {
                       "name": "now", "strict": False}}],
                   "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 77,
                   "temperature": 0.2, "top_p": 0.9, "user": "u-1", "stream": True,
                   "stream_options": {"include_usage": True}}
    assert "stream" not in translate(body)  # the caller decides
    anthropic = translate(body, "anthropic")  # the Messages adapter has no strict mode
    assert [t["function"] for t in anthropic["tools"]] == [
        {k: v for k, v in CHAT_WEATHER["function"].items() if k != "strict"},
        {"name": "now"}]
    # Without tools, tool_choice and parallel_tool_calls have nothing to apply to.
    bare = translate({"model": "r", "input": "x", "tool_choice": "none",
                      "parallel_tool_calls": True, "safety_identifier": "s-1"})
    assert bare == {"model": "up-model", "messages": [{"role": "user", "content": "x"}],
                    "user": "s-1"}


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", "auto"), ("none", "none"), ("required", "required"),
    ({"type": "function", "name": "get_weather"},
     {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice(choice: Any, expected: Any) -> None:
    out = translate({"model": "r", "input": "x", "tools": [WEATHER], "tool_choice": choice})
    assert out["tool_choice"] == expected


def test_text_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True,
           "description": "A thing"}
    body = {"model": "r", "input": "x", "text": {"format": fmt}}
    for target in ("self-hosted", "openai"):
        assert translate(body, target)["response_format"] == {
            "type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                   "strict": True, "description": "A thing"}}
    assert translate({**body, "text": {"format": {"type": "json_object"}}})[
        "response_format"] == {"type": "json_object"}
    assert "response_format" not in translate({**body, "text": {"format": {"type": "text"}}})
    for fmt_type in ("json_schema", "json_object"):
        err = invalid({**body, "text": {"format": {**fmt, "type": fmt_type}}}, "anthropic")
        assert err.param == "text.format" and "anthropic" in err.message
        assert fmt_type in err.message


@pytest.mark.parametrize("kind", ["web_search", "web_search_preview", "file_search",
                                  "computer_use_preview", "code_interpreter",
                                  "image_generation", "mcp", "local_shell", "shell",
                                  "custom", "apply_patch"])
def test_built_in_tools_are_refused_by_name(kind: str) -> None:
    err = invalid({"model": "r", "input": "x", "tools": [WEATHER, {"type": kind}]})
    assert err.param == "tools[1].type" and repr(kind) in err.message


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "send the whole input"),
    ({"conversation": "conv_1"}, "conversation", "send the whole input"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "send the whole input"),
    ({"background": True}, "background", "background"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type",
     "send the whole input"),
])
def test_stateful_features_get_400(extra: dict[str, Any], param: str, words: str) -> None:
    err = invalid({"model": "r", "input": "x", **extra})
    assert err.param == param and words in err.message
    assert "background" not in translate({"model": "r", "input": "x", "background": False})


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": [5]}, "input[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 1}]}]},
     "input[0].content[0].text"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].file_id"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "ftp://e.com/a.png"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"role": "system", "content": [
        {"type": "input_image", "image_url": "https://e.com/a.png"}]}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]},
     "input[0].content"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]},
     "input[0].name"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
     "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
     "input[0].output"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"input": "x", "instructions": 5}, "instructions"),
    ({"input": "x", "tools": {}}, "tools"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "tools": [{**WEATHER, "parameters": []}]}, "tools[0].parameters"),
    ({"input": "x", "tools": [{**WEATHER, "strict": "yes"}]}, "tools[0].strict"),
    ({"input": "x", "tools": [{**WEATHER, "description": 3}]}, "tools[0].description"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function"}},
     "tool_choice.name"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}},
     "tool_choice"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "allowed_tools"}},
     "tool_choice"),
    ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "x", "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": True}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 1.5}, "max_output_tokens"),
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "top_p": False}, "top_p"),
    ({"input": "x", "user": 5}, "user"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"input": "x", "stream": "yes"}, "stream"),
    ({"input": "x", "text": "json"}, "text"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
     "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {},
                                       "strict": "no"}}}, "text.format.strict"),
])
def test_invalid_bodies_name_the_param(body: dict[str, Any], param: str) -> None:
    assert invalid({"model": "r", **body}).param == param


def test_prompt_view_counts_like_the_translated_request() -> None:
    session = json.loads((FIXTURES / "codex_session.json").read_text())["request"]
    chat = to_chat_request(session, "m", stream=False, target_provider="self-hosted")
    # An estimate (ids, role names and the tool schemas' wrapping differ by a few tokens).
    viewed, translated = (count_prompt_tokens(b, "o200k_base") for b in (
        prompt_view(session), chat))
    assert translated > 400 and abs(viewed - translated) <= translated * 0.02
    body = {"model": "r", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://e.com/a.png", "detail": "low"}]}],
        "tools": [{"type": "web_search"}], "previous_response_id": "resp_1",
        "max_output_tokens": 100}
    view = prompt_view(body)  # what only an openai target accepts is still counted
    assert count_prompt_tokens(view, "o200k_base") == count_prompt_tokens(
        {"messages": [{"role": "user", "content": []}], "tools": body["tools"]},
        "o200k_base") + IMAGE_TOKENS
    assert reservation(view["max_tokens"], 10, 4096, 0) == 110
    # Whatever is not a message or a part is left out: the reply's priming, and one empty turn.
    for hostile, view_tokens in (({}, 3), ({"input": 5, "instructions": 3,
                                            "max_output_tokens": True}, 3),
                                 ({"input": [5, {"type": "x"},
                                             {"role": "user", "content": [1, {}]}]}, 7)):
        assert count_prompt_tokens(prompt_view(hostile), "o200k_base") == view_tokens


# -- response -----------------------------------------------------------------------------------


def chat_completion(message: dict[str, Any], finish: str | None = "stop",
                    usage: dict[str, Any] | None = None) -> dict[str, Any]:
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        chat["usage"] = usage
    ChatCompletion.model_validate(chat)
    return chat


USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
         "prompt_tokens_details": {"cached_tokens": 6},
         "completion_tokens_details": {"reasoning_tokens": 4}}
CALLS = [{"id": "call_a", "type": "function",
          "function": {"name": "lookup", "arguments": "{\"q\": \"cats\", \"n\": 2}"}},
         {"id": "call_b", "type": "function", "function": {"name": "other", "arguments": "{}"}}]


def response_of(chat: dict[str, Any], request: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], Any]:
    request = request or {"model": "route", "input": "x"}
    to_chat_request(request, "up", stream=False, target_provider="self-hosted")  # the contract
    before = copy.deepcopy(chat)
    response, usage = to_response(chat, "route", request=request)
    assert chat == before
    strict(Response.model_validate(response))
    return response, usage


def test_response_text_usage_and_echo() -> None:
    response, usage = response_of(chat_completion({"content": "Hi there"}, usage=USAGE))
    assert re.fullmatch(r"resp_[0-9a-f]{32}", response["id"])
    assert (response["object"], response["model"], response["status"]) == (
        "response", "route", "completed")
    assert isinstance(response["created_at"], int) and response["incomplete_details"] is None
    assert Response.model_validate(response).output_text == "Hi there"
    [item] = copy.deepcopy(response["output"])
    assert re.fullmatch(r"msg_[0-9a-f]{32}", item.pop("id"))
    assert item == {"type": "message", "role": "assistant", "status": "completed", "content": [
        {"type": "output_text", "text": "Hi there", "annotations": [], "logprobs": []}]}
    assert response["usage"] == {
        "input_tokens": 20, "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
        "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4},
        "total_tokens": 29}
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens,
            usage.reasoning_tokens, usage.reported) == (20, 9, 6, 4, True)


def test_response_echoes_the_request() -> None:
    request = {"model": "route", "input": "x", "instructions": "Be brief.", "tools": [WEATHER],
               "tool_choice": {"type": "function", "name": "get_weather"},
               "parallel_tool_calls": False, "temperature": 0.5, "top_p": 0.8,
               "max_output_tokens": 100, "metadata": {"k": "v"}, "user": "u",
               "text": {"format": {"type": "json_schema", "name": "t", "schema": {}}}}
    response, _ = response_of(chat_completion({"content": "{}"}), request)
    assert {k: response[k] for k in ("instructions", "tool_choice", "parallel_tool_calls",
                                     "temperature", "top_p", "max_output_tokens", "metadata",
                                     "user", "text")} == {
        "instructions": "Be brief.", "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False, "temperature": 0.5, "top_p": 0.8,
        "max_output_tokens": 100, "metadata": {"k": "v"}, "user": "u",
        "text": {"format": {"type": "json_schema", "name": "t", "schema": {}}}}
    assert response["tools"] == [WEATHER]
    bare, _ = response_of(chat_completion({"content": "x"}))
    assert (bare["tools"], bare["tool_choice"], bare["parallel_tool_calls"], bare["text"],
            bare["metadata"], bare["instructions"]) == (
        [], "auto", True, {"format": {"type": "text"}}, {}, None)


def test_response_function_calls() -> None:
    response, _ = response_of(chat_completion({"content": None, "tool_calls": CALLS},
                                              "tool_calls", USAGE))
    calls = response["output"]
    assert [re.fullmatch(r"fc_[0-9a-f]{32}", c.pop("id")) is not None for c in calls] == [
        True, True]
    assert calls == [
        {"type": "function_call", "status": "completed", "call_id": "call_a",
         "name": "lookup", "arguments": "{\"q\": \"cats\", \"n\": 2}"},
        {"type": "function_call", "status": "completed", "call_id": "call_b",
         "name": "other", "arguments": "{}"}]
    both, _ = response_of(chat_completion({"content": "Checking.", "tool_calls": CALLS},
                                          "tool_calls"))
    assert [i["type"] for i in both["output"]] == ["message", "function_call", "function_call"]


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"),
                                                ("content_filter", "content_filter")])
def test_response_incomplete(finish: str, reason: str) -> None:
    response, _ = response_of(chat_completion({"content": "word0 word1"}, finish))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": reason}
    assert response["output"][0]["status"] == "incomplete"
    cut, _ = response_of(chat_completion({"content": "a", "tool_calls": CALLS}, "length"))
    assert [i["status"] for i in cut["output"]] == ["completed", "completed", "incomplete"]


def test_response_refusal_empty_reply_and_unreported_usage() -> None:
    response, _ = response_of(chat_completion({"content": None, "refusal": "I can't."}))
    assert response["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't."}]
    empty, usage = response_of(chat_completion({"content": None}))
    assert empty["output"][0]["content"] == [
        {"type": "output_text", "text": "", "annotations": [], "logprobs": []}]
    assert empty["usage"] is None and not usage.reported and usage.generated == ()
    hostile = chat_completion({"content": "hi", "tool_calls": CALLS})
    _, usage = response_of({**hostile, "usage": {"prompt_tokens": -1, "completion_tokens": 2}})
    assert not usage.reported
    assert usage.generated == ("hi", "lookup", "{\"q\": \"cats\", \"n\": 2}", "other", "{}")


@pytest.mark.parametrize("chat", [
    {}, {"choices": None}, {"choices": []}, {"choices": [1]}, {"choices": [{"message": "x"}]},
    {"choices": [{"message": {"content": 5}}]},
    {"choices": [{"message": {"content": ["x"]}}]},
    {"choices": [{"message": {"content": "x", "refusal": 1}}]},
    {"choices": [{"message": {"tool_calls": "x"}}]},
    {"choices": [{"message": {"tool_calls": [1]}}]},
    {"choices": [{"message": {"tool_calls": [{"function": "f"}]}}]},
    {"choices": [{"message": {"tool_calls": [{"function": {"name": 1, "arguments": "{}"}}]}}]},
    {"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": {}}}]}}]},
])
def test_hostile_chat_completions_are_502(chat: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError):
        to_response(chat, "m", request={"model": "m", "input": "x"})


def test_hostile_but_readable_values_are_repaired() -> None:
    response, usage = response_of({"choices": [{"message": {"content": "x", "tool_calls": [
        {"id": 5, "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": 9}],
        "usage": {"prompt_tokens": 10**30, "completion_tokens": 1,
                  "completion_tokens_details": {"reasoning_tokens": 50}}})
    assert response["status"] == "completed"
    assert re.fullmatch(r"call_[0-9a-f]{32}", response["output"][1]["call_id"])
    assert (usage.input_tokens, usage.reasoning_tokens) == (2**53, 1)


# -- stream -------------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "chatcmpl-9", "object": "chat.completion.chunk",
                            "created": 1, "model": "up", "choices": []}
    if delta is not None or finish is not None:
        data["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None,
                            "finish_reason": finish}]
    if usage is not None:
        data["usage"] = usage
    ChatCompletionChunk.model_validate(data)
    return data


def frames(*items: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (i.encode() if isinstance(i, str) else json.dumps(i).encode())
                    + b"\n\n" for i in items)


def call_delta(index: int, *, id: str | None = None, name: str | None = None,
               arguments: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if id is not None:
        call.update(id=id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


START = chunk({"role": "assistant", "content": ""})
TEXT = [chunk({"content": "Hel"}), chunk({"content": "lo, \"wörld\" ✓\n"})]
ONE_CALL = [chunk(call_delta(0, id="call_a", name="lookup")),
            chunk(call_delta(0, arguments="{\"q\": \"ca")),
            chunk(call_delta(0, arguments="ts\", \"n\": 2}"))]
SECOND_CALL = [chunk(call_delta(1, id="call_b", name="other", arguments="{}"))]
END_USAGE = chunk(usage=USAGE)
SCENARIOS = {
    "text": frames(START, *TEXT, chunk(finish="stop"), END_USAGE, "[DONE]"),
    "one_call": frames(START, *ONE_CALL, chunk(finish="tool_calls"), END_USAGE, "[DONE]"),
    "parallel_calls": frames(START, *ONE_CALL, *SECOND_CALL, chunk(finish="tool_calls"),
                             END_USAGE, "[DONE]"),
    "text_then_calls": frames(START, *TEXT, *ONE_CALL, *SECOND_CALL,
                              chunk(finish="tool_calls"), END_USAGE, "[DONE]"),
    "length": frames(START, *TEXT, chunk(finish="length"), END_USAGE, "[DONE]"),
}
REQUEST = {"model": "route", "input": "x", "tools": [WEATHER], "instructions": "Be brief."}


def accumulate(source: bytes) -> dict[str, Any]:
    """The chat.completion a chat stream amounts to (what the non-stream call would return)."""
    content, calls, finish, usage = "", [], None, None
    for frame in source.split(b"\n\n"):
        if not frame or frame == b"data: [DONE]":
            continue
        data = json.loads(frame[6:])
        usage = data.get("usage") or usage
        for choice in data["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                if call.get("id"):
                    calls.append({"id": call["id"], "type": "function", "function": {
                        "name": call["function"]["name"], "arguments": ""}})
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    message: dict[str, Any] = {"content": content or None}
    if calls:
        message["tool_calls"] = calls
    return chat_completion(message, finish, usage)


def run(pieces: list[bytes], request: dict[str, Any] = REQUEST,
        **options: Any) -> tuple[bytes, ChatToResponsesStream]:
    before = copy.deepcopy(request)
    tr = ChatToResponsesStream("route", request, COUNT, **options)
    out = b"".join(tr.feed(p) for p in pieces) + tr.finish()
    assert request == before
    assert b"[DONE]" not in out
    return out, tr


def events(out: bytes) -> list[dict[str, Any]]:
    """Each event framed as `event: <type>` + `data: <json>`, valid for the SDK, in sequence."""
    parsed = []
    for frame in out.split(b"\n\n")[:-1]:
        head, data = frame.split(b"\n")
        assert data.startswith(b"data: ")
        event = json.loads(data[6:])
        assert head == b"event: " + event["type"].encode()
        strict(_EVENT.validate_python(event))
        parsed.append(event)
    assert out.endswith(b"\n\n")
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    return parsed


def through_sdk(out: bytes) -> tuple[list[Any], Any]:
    """Our bytes read by the SDK's `responses.stream()`, which accumulates the events and checks
    their order (items, parts, indexes); the final response, or None when not completed."""
    transport = httpx2.MockTransport(lambda request: httpx2.Response(
        200, content=out, headers={"content-type": "text/event-stream"}))
    client = openai.OpenAI(api_key="x", base_url="http://gateway/v1", max_retries=0,
                           http_client=httpx2.Client(transport=transport))
    with client, client.responses.stream(model="route", input="x") as stream:
        got = list(stream)
        try:
            return got, stream.get_final_response()
        except RuntimeError:
            return got, None


_IDS = re.compile(rb"(resp|msg|fc|call)_[0-9a-f]{32}")


def normalized(out: bytes) -> bytes:
    """Ids and times made comparable between runs (ids by order of appearance)."""
    seen: dict[bytes, bytes] = {}
    out = _IDS.sub(lambda m: seen.setdefault(m.group(0), b"%s_%d" % (m.group(1), len(seen))),
                   out)
    return re.sub(rb'"created_at":\d+', b'"created_at":0', out)


def without_ids(response: dict[str, Any]) -> dict[str, Any]:
    return json.loads(normalized(json.dumps(response, separators=(",", ":")).encode()))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_stream_events_validate_and_match_the_non_stream_response(name: str) -> None:
    source = SCENARIOS[name]
    out, tr = run([source])
    got = events(out)
    kinds = [e["type"] for e in got]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    final = got[-1]
    assert final["type"] == ("response.incomplete" if name == "length"
                             else "response.completed")
    expected, _ = to_response(accumulate(source), "route", request=REQUEST)
    assert without_ids(final["response"]) == without_ids(expected)
    assert final["response"]["id"] == got[0]["response"]["id"]
    assert (tr.usage().input_tokens, tr.usage().output_tokens, tr.usage().cached_tokens,
            tr.usage().reasoning_tokens) == (20, 9, 6, 4)
    assert tr.error is None
    # Items never interleave: each opens after the previous one is done.
    opened = None
    for event in got:
        if event["type"] == "response.output_item.added":
            assert opened is None
            opened = event["output_index"]
        elif event["type"] == "response.output_item.done":
            assert event["output_index"] == opened
            opened = None
        elif "output_index" in event:
            assert event["output_index"] == opened
    sdk_events, sdk_final = through_sdk(out)
    assert [e.type for e in sdk_events] == kinds
    if name != "length":
        assert sdk_final.model_dump(exclude_none=True)["output"] == final["response"]["output"]


def test_stream_text_event_sequence() -> None:
    got = events(run([SCENARIOS["text"]])[0])
    assert [e["type"] for e in got] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    item_id = got[2]["item"]["id"]
    assert got[2]["item"] == {"id": item_id, "type": "message", "role": "assistant",
                              "status": "in_progress", "content": []}
    assert got[4] == {"type": "response.output_text.delta", "sequence_number": 4,
                      "item_id": item_id, "output_index": 0, "content_index": 0,
                      "delta": "Hel", "logprobs": []}
    assert got[6]["text"] == "Hello, \"wörld\" ✓\n" and got[6]["logprobs"] == []
    assert got[-1]["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}


def test_stream_call_event_sequence() -> None:
    got = events(run([SCENARIOS["parallel_calls"]])[0])
    assert [e["type"] for e in got][2:] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    added = got[2]["item"]
    assert added == {"id": added["id"], "type": "function_call", "status": "in_progress",
                     "call_id": "call_a", "name": "lookup", "arguments": ""}
    assert got[5] == {"type": "response.function_call_arguments.done", "sequence_number": 5,
                      "item_id": added["id"], "output_index": 0,
                      "arguments": "{\"q\": \"cats\", \"n\": 2}"}
    assert got[7]["output_index"] == 1 and got[7]["item"]["call_id"] == "call_b"


def test_stream_length_marks_the_last_item_incomplete() -> None:
    got = events(run([SCENARIOS["length"]])[0])
    assert got[-2]["item"]["status"] == "incomplete"
    assert got[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got[-1]["response"]["status"] == "incomplete"


def test_stream_split_at_every_byte_offset() -> None:
    for name in ("text", "text_then_calls"):
        source = SCENARIOS[name]
        whole = normalized(run([source])[0])
        for at in range(1, len(source)):
            assert normalized(run([source[:at], source[at:]])[0]) == whole, (name, at)
        assert normalized(run([source[i:i + 1] for i in range(len(source))])[0]) == whole


def test_stream_random_splits_and_line_ends() -> None:
    rng = random.Random(20261201)
    for name, source in SCENARIOS.items():
        whole = normalized(run([source])[0])
        for variant in (source, source.replace(b"\n", b"\r\n"), source.replace(b"\n", b"\r")):
            for _ in range(40):
                cuts = sorted(rng.sample(range(1, len(variant)), rng.randint(1, 30)))
                pieces = [variant[a:b] for a, b in zip([0, *cuts], [*cuts, len(variant)],
                                                       strict=True)]
                assert normalized(run(pieces)[0]) == whole, name


def failed(out: bytes) -> dict[str, Any]:
    got = events(out)
    assert got[0]["type"] == "response.created"
    assert got[-1]["type"] == "response.failed"
    response = got[-1]["response"]
    assert response["status"] == "failed"
    assert response["error"] == {"code": "server_error",
                                 "message": "the upstream provider failed during the stream"}
    _, final = through_sdk(out)
    assert final is None
    return response


def test_stream_error_frame_cut_stream_and_fail() -> None:
    error = {"error": {"message": "secret internals", "type": "server_error"}}
    out, tr = run([frames(START, *TEXT, error, *TEXT, chunk(finish="stop"))])
    response = failed(out)
    assert b"secret" not in out and isinstance(tr.error, UpstreamError)
    assert response["output"][0]["status"] == "incomplete"
    assert response["output"][0]["content"][0]["text"] == "Hello, \"wörld\" ✓\n"
    assert not tr.usage().reported and tr.generated.count() > 0
    out, tr = run([frames(START, *TEXT)])  # cut: no finish reason
    failed(out)
    assert tr.error is not None and tr.error.code == "upstream_incomplete_stream"
    out, tr = run([])  # nothing at all
    failed(out)
    tr = ChatToResponsesStream("route", REQUEST, COUNT)
    out = tr.feed(frames(START, *ONE_CALL[:2])) + tr.fail(UpstreamError("read timed out"))
    assert tr.fail(UpstreamError("again")) == b"" and tr.feed(frames(*TEXT)) == b""
    assert tr.finish() == b""
    assert failed(out)["output"][0]["arguments"] == "{\"q\": \"ca"


def test_stream_bounds() -> None:
    out, tr = run([frames(START, *TEXT * 100, chunk(finish="stop"))], max_output_bytes=1000)
    response = failed(out)
    assert 980 < len(response["output"][0]["content"][0]["text"].encode()) <= 1000
    assert tr.error is not None and tr.error.code == "upstream_response_too_large"
    tr = ChatToResponsesStream("route", REQUEST, COUNT)
    out = tr.feed(b"data: " + b"x" * (2 << 20))  # an event that never ends
    failed(out + tr.finish())
    assert tr.error is not None and tr.error.code == "upstream_response_too_large"


def test_stream_interleaved_calls_fail_rather_than_interleave() -> None:
    out, tr = run([frames(START, *ONE_CALL, *SECOND_CALL, chunk(call_delta(0, arguments="x")),
                          chunk(finish="tool_calls"))])
    failed(out)
    assert tr.error is not None and "interleaved" in tr.error.message


def test_stream_without_usage_and_text_after_calls() -> None:
    source = frames(START, *ONE_CALL, *TEXT, chunk(finish="stop"), "[DONE]")
    out, tr = run([source])
    got = events(out)
    assert [i["type"] for i in got[-1]["response"]["output"]] == ["function_call", "message"]
    assert got[-1]["response"]["usage"] is None and not tr.usage().reported
    assert tr.generated.count() > 0
    out, tr = run([frames(START, chunk(finish="stop"))])  # no [DONE]: still complete
    final = events(out)[-1]
    assert final["type"] == "response.completed"
    assert final["response"]["output"][0]["content"][0]["text"] == ""


def test_stream_refusal() -> None:
    out, _ = run([frames(START, chunk({"refusal": "I can"}), chunk({"refusal": "'t."}),
                         chunk(finish="stop"), "[DONE]")])
    got = events(out)
    assert "response.refusal.delta" in [e["type"] for e in got]
    assert got[-1]["response"]["output"][0]["content"] == [
        {"type": "refusal", "refusal": "I can't."}]
    through_sdk(out)


HOSTILE = [
    "{bad json", "[1, 2]", "\"text\"", "null", {"choices": "x"}, {"choices": [1]},
    {"choices": [{"index": 0, "delta": "str"}]},
    {"choices": [{"index": 1, "delta": {"content": "other choice"}}]},
    {"choices": [{"index": 0, "delta": {"content": 5, "refusal": [], "tool_calls": "x"}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [
        1, {"index": [1], "function": "x"},
        {"index": [1], "id": 5, "function": {"name": 7, "arguments": 9}}]}}]},
    {"usage": {"prompt_tokens": -1, "completion_tokens": 1e30}},
    {"usage": "lots", "choices": None},
]


def test_hostile_upstream_values_never_crash() -> None:
    body = b"".join(b"data: " + (h.encode() if isinstance(h, str) else json.dumps(h).encode())
                    + b"\n\n" for h in HOSTILE)
    source = frames(START, *TEXT) + body + b"event: x\n\n: comment\n\n" + frames(
        {"choices": [{"index": 0, "delta": {}, "finish_reason": 7}]})
    out, tr = run([source])
    got = events(out)
    assert got[-1]["type"] == "response.completed"
    assert [i["type"] for i in got[-1]["response"]["output"]] == ["message", "function_call"]
    call = got[-1]["response"]["output"][1]
    assert call["name"] == "" and re.fullmatch(r"call_[0-9a-f]{32}", call["call_id"])
    assert not tr.usage().reported
    through_sdk(out)


# -- composition with the Anthropic adapter -----------------------------------------------------


def to_anthropic(body: dict[str, Any], stream: bool = False,
                 sdk_shape: bool = True) -> dict[str, Any]:
    chat = translate(body, "anthropic", stream=stream, sdk_shape=sdk_shape)
    out = to_messages_request(chat, "claude-x", 1024, stream)
    _ANTHROPIC.validate_python(out)
    return out


def test_anthropic_text_exchange() -> None:
    body = {"model": "route", "instructions": "Be brief.", "input": [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
             "detail": "low"}]}],
        "temperature": 0.3, "top_p": 0.9, "user": "u-1", "max_output_tokens": 50,
        "store": True, "text": {"format": {"type": "text"}}}
    assert to_anthropic(body) == {
        "model": "claude-x", "max_tokens": 50, "system": "Be brief.\n\nAnswer in French.",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]}],
        "temperature": 0.3, "top_p": 0.9, "metadata": {"user_id": "u-1"}}
    no_limit = {k: v for k, v in body.items() if k != "max_output_tokens"}
    assert to_anthropic(no_limit)["max_tokens"] == 1024  # Anthropic's required default
    assert to_anthropic(body, stream=True)["stream"] is True
    message = json.loads(anthropic_message(
        [{"type": "text", "text": "C'est un chat."}], "end_turn",
        {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 4}))
    chat, _ = to_chat_completion(message, "route")
    response, usage = response_of(chat, body)
    assert Response.model_validate(response).output_text == "C'est un chat."
    assert response["usage"]["input_tokens"] == 14
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == 4
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (14, 5, 4)
    cut = json.loads(anthropic_message([{"type": "text", "text": "C'est"}], "max_tokens"))
    response, _ = response_of(to_chat_completion(cut, "route")[0], body)
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


def test_anthropic_tool_exchange() -> None:
    body = {"model": "route", "input": [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"type": "function_call", "call_id": "toolu_1", "name": "get_weather",
         "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call", "call_id": "toolu_2", "name": "get_weather",
         "arguments": "{\"city\": \"Oslo\"}"},
        {"type": "function_call_output", "call_id": "toolu_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "toolu_2",
         "output": [{"type": "input_text", "text": "rain"}]}],
        "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    assert to_anthropic(body) == {
        "model": "claude-x", "max_tokens": 1024,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Oslo?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2",
                 "content": [{"type": "text", "text": "rain"}]}]}],
        "tools": [{"name": "get_weather", "description": "Weather in a city",
                   "input_schema": WEATHER["parameters"]}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    message = json.loads(anthropic_message([
        {"type": "tool_use", "id": "toolu_3", "name": "get_weather", "input": {"city": "Rome"}},
    ], "tool_use"))
    response, _ = response_of(to_chat_completion(message, "route")[0], body)
    [call] = response["output"]
    assert (call["type"], call["call_id"], call["name"], json.loads(call["arguments"])) == (
        "function_call", "toolu_3", "get_weather", {"city": "Rome"})


def chained() -> ChainedStream:
    return ChainedStream(AnthropicStream("route", True, COUNT),
                         ChatToResponsesStream("route", REQUEST, None))


def test_anthropic_stream_through_the_chain() -> None:
    source = sse(*TEXT_EVENTS, *TOOL_EVENTS, *END_EVENTS)
    whole = None
    for pieces in ([source], [source[i:i + 7] for i in range(0, len(source), 7)]):
        tr = chained()
        out = b"".join(tr.feed(p) for p in pieces) + tr.finish()
        got = events(out)
        assert whole is None or normalized(out) == whole
        whole = normalized(out)
        final = got[-1]["response"]
        assert got[-1]["type"] == "response.completed"
        assert [(i["type"], i.get("call_id")) for i in final["output"]] == [
            ("message", None), ("function_call", "toolu_a"), ("function_call", "toolu_b")]
        assert final["output"][0]["content"][0]["text"] == "Hello, \"wörld\" ✓\n"
        assert json.loads(final["output"][1]["arguments"]) == {"q": "cats", "n": 2}
        assert final["usage"]["input_tokens"] == 20 and final["usage"]["output_tokens"] == 42
        usage = tr.usage()
        assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (20, 42, 6)
        assert tr.error is None
        through_sdk(out)


def test_anthropic_stream_error_keeps_the_precise_error() -> None:
    tr = chained()
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    out = tr.feed(sse(*TEXT_EVENTS[:4], error)) + tr.feed(sse(*TEXT_EVENTS[4:])) + tr.finish()
    failed(out)
    assert isinstance(tr.error, ServiceUnavailable)
    tr = chained()
    out = tr.feed(sse(*TEXT_EVENTS[:4])) + tr.fail(UpstreamError("cut"))
    failed(out)


# -- a recorded Codex session -------------------------------------------------------------------


def codex() -> dict[str, Any]:
    return json.loads((FIXTURES / "codex_session.json").read_text())


def test_codex_session_to_chat_and_anthropic() -> None:
    session = codex()
    request = session["request"]
    # Codex sends its assistant messages without the id and status that the SDK's param type
    # requires of an output message (OpenAI accepts them), so the SDK check is left out.
    chat = translate(request, "self-hosted", stream=True, sdk_shape=False)
    assert [m["role"] for m in chat["messages"]] == [
        "system", "system", "user", "user", "assistant", "tool", "tool"]
    assert chat["messages"][0]["content"] == request["instructions"]
    assert chat["messages"][1]["content"].startswith("<permissions instructions>")
    assistant = chat["messages"][4]
    assert assistant["content"] == "Running the tests and reading the README in parallel."
    assert [(c["id"], c["function"]["name"]) for c in assistant["tool_calls"]] == [
        ("call_tests", "shell"), ("call_readme", "shell")]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"])["command"] == [
        "bash", "-lc", "pytest -q"]
    assert [(m["tool_call_id"], json.loads(m["content"])["metadata"]["exit_code"])
            for m in chat["messages"][5:]] == [("call_tests", 1), ("call_readme", 0)]
    assert [t["function"]["name"] for t in chat["tools"]] == [
        "shell", "update_plan", "view_image"]
    assert all(t["function"]["strict"] is False for t in chat["tools"])
    assert (chat["tool_choice"], chat["parallel_tool_calls"], chat["stream_options"]) == (
        "auto", True, {"include_usage": True})
    assert not {"reasoning", "store", "include", "prompt_cache_key", "text"} & set(chat)

    messages = to_anthropic(request, stream=True, sdk_shape=False)
    assert messages["system"] == request["instructions"] + "\n\n" + request["input"][0][
        "content"][0]["text"]
    assert [m["role"] for m in messages["messages"]] == ["user", "assistant", "user"]
    assert [b["type"] for b in messages["messages"][1]["content"]] == [
        "text", "tool_use", "tool_use"]
    assert [b["tool_use_id"] for b in messages["messages"][2]["content"]] == [
        "call_tests", "call_readme"]
    assert messages["tool_choice"] == {"type": "auto"}
    assert messages["tools"][0]["input_schema"] == request["tools"][0]["parameters"]


def test_codex_session_replies() -> None:
    session = codex()
    request = session["request"]
    for chat in (session["chat_reply"],
                 to_chat_completion(session["anthropic_reply"], "codex-route")[0]):
        response, usage = response_of(chat, request)
        assert [i["type"] for i in response["output"]] == [
            "message", "function_call", "function_call"]
        assert [json.loads(i["arguments"]) for i in response["output"][1:]] == [
            {"command": ["bash", "-lc", "sed -n 1,40p shop/cart.py"],
             "workdir": "/home/dev/shop"},
            {"plan": [{"step": "Fix total", "status": "in_progress"}]}]
        assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (
            1830, 96, 1536)
        assert response["tools"] == request["tools"] and response["parallel_tool_calls"]
    # The reply's calls go back in the next turn as parallel calls with their outputs.
    follow = {**request, "input": [*request["input"], *[
        {k: v for k, v in item.items() if k not in ("id", "status")}
        for item in response["output"]], *[
        {"type": "function_call_output", "call_id": item["call_id"], "output": "ok"}
        for item in response["output"][1:]]]}
    messages = to_anthropic(follow, sdk_shape=False)["messages"]
    assert [b["type"] for b in messages[-2]["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["tool_use_id"] for b in messages[-1]["content"]] == ["toolu_cat", "toolu_plan"]
