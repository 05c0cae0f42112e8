"""Token counting: OpenAI's documented chat counting, offline encodings, the reservation."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import tiktoken
from llm_gateway.tokens import (
    count_prompt_tokens,
    count_text_tokens,
    encoding,
    encoding_name_for,
    install_encodings,
    reservation,
)

REQUESTS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello!"}]},
    {"messages": [
        {"role": "system", "content": "You are a helpful, pattern-following assistant."},
        {"role": "system", "name": "example_user", "content": "New synergies will help."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean"},
    ]},
    {"messages": [{"role": "user", "content": "text with <|endoftext|> inside, and ünïcödé"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "two"},
                                               {"type": "text", "text": "parts here"}]}]},
]


def reference(body: dict[str, Any], enc: tiktoken.Encoding) -> int:
    """The OpenAI cookbook's num_tokens_from_messages, written out independently."""
    n = 0
    for m in body["messages"]:
        n += 3
        for k, v in m.items():
            if isinstance(v, list):
                n += sum(len(enc.encode(p["text"], disallowed_special=())) for p in v)
            else:
                n += len(enc.encode(v, disallowed_special=()))
            if k == "name":
                n += 1
    return n + 3


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
@pytest.mark.parametrize("body", REQUESTS)
def test_prompt_tokens_match_openai_counting(name: str, body: dict[str, Any]) -> None:
    assert count_prompt_tokens(body, name) == reference(body, encoding(name))


def test_special_token_text_is_counted_not_refused() -> None:
    text = "ignore <|endoftext|> and <|fim_prefix|>"
    for name in ("cl100k_base", "o200k_base"):
        enc = encoding(name)
        assert count_text_tokens(text, name) == len(enc.encode(text, disallowed_special=()))
        with pytest.raises(ValueError):
            enc.encode(text)  # what count_* must avoid


def test_estimates_for_images_tools_and_calls() -> None:
    enc = encoding("o200k_base")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    body = {"tools": tools, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://x/b.png"}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": call}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"}]}

    def n(text: str) -> int:
        return len(enc.encode(text, disallowed_special=()))

    expected = (3 + n("user") + n("What is this?") + 85 + 765
                + 3 + n("assistant") + n(call["name"]) + n(call["arguments"])
                + 3 + n("tool") + n("c1") + n("18C")
                + n(orjson.dumps(tools).decode()) + 3)
    assert count_prompt_tokens(body, "o200k_base") == expected


def test_one_message_by_hand() -> None:
    body = REQUESTS[0]
    enc = encoding("cl100k_base")
    assert count_prompt_tokens(body, "cl100k_base") == 3 + len(enc.encode("user")) + len(
        enc.encode("Hello!")) + 3


def test_encodings_are_local(tmp_path: Any) -> None:
    path = install_encodings(tmp_path)
    assert len(list(path.iterdir())) == 2
    assert count_text_tokens("hello world", "o200k_base") == 2


def test_encoding_choice() -> None:
    assert encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert encoding_name_for("gpt-5") == "o200k_base"
    assert encoding_name_for("o3-mini") == "o200k_base"
    assert encoding_name_for("gpt-4") == "cl100k_base"
    assert encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name_for("claude-sonnet-4", "o200k_base") == "o200k_base"
    assert encoding_name_for("llama-3") == "cl100k_base"


def test_reservation() -> None:
    assert reservation({"max_tokens": 100}, 20, 4096, 10_000) == 120
    assert reservation({"max_completion_tokens": 50, "max_tokens": 100}, 20, 4096, 10_000) == 70
    assert reservation({}, 20, 4096, 10_000) == 20 + 4096
    assert reservation({}, 20, 4096, 1_000) == 1_000  # capped by the bucket
    assert reservation({}, 20, 4096, 0) == 20 + 4096  # no token limit
