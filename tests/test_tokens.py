"""Token counting: OpenAI's documented chat counting, offline encodings, the reservation."""

from __future__ import annotations

import ast
import asyncio
import inspect
import pickle
import random
import time
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
    assert reservation(100, 20, 4096, 10_000) == 120
    assert reservation(None, 20, 4096, 10_000) == 20 + 4096
    assert reservation(None, 20, 4096, 1_000) == 1_000  # capped by the bucket
    assert reservation(None, 20, 4096, 0) == 20 + 4096  # no token limit


TEXTS = [
    "Hello!",
    "text with <|endoftext|> inside, and ünïcödé",
    "ignore <|endoftext|> and <|fim_prefix|> <|endofprompt|>",
    "日本語のテキストと emoji 🤖🚀, and Ελληνικά",
    "def f(x):\n    return x ** 2  # code\n\n\n\t\tindented",
    "   leading and trailing spaces   ",
    "numbers 1234567890 3.14159 1e-10 0xDEADBEEF",
    "a lone surrogate \ud800 in the middle",
    " ".join(f"word{i}" for i in range(2000)),
]


def independent(name: str) -> tiktoken.Encoding:
    """A fresh Encoding with its own ranks, built past tiktoken's registry and our loader."""
    from tiktoken_ext import openai_public

    encoding(name)  # installs the files and points TIKTOKEN_CACHE_DIR at them
    return tiktoken.Encoding(**getattr(openai_public, name)())


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_counts_match_an_independent_encoding(name: str) -> None:
    ours, theirs = encoding(name), independent(name)
    assert not hasattr(ours, "_mergeable_ranks")
    for text in TEXTS:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
        assert count_text_tokens(text, name) == len(theirs.encode_ordinary(text))
    for body in REQUESTS:
        assert count_prompt_tokens(body, name) == reference(body, theirs)
    assert ours.n_vocab == theirs.n_vocab


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_encoding_without_python_ranks_still_works(name: str) -> None:
    enc = encoding(name)
    text = TEXTS[3]
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [enc.eot_token]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")
    # registered, so pickled by name: the copy shares the loaded CoreBPE
    assert pickle.loads(pickle.dumps(enc))._core_bpe is enc._core_bpe


def test_tiktoken_reads_python_ranks_only_to_construct_and_pickle() -> None:
    """Dropping `_mergeable_ranks` is safe only while this holds; a tiktoken upgrade that reads
    it anywhere else in `tiktoken.core` must fail here, not at run time."""
    import tiktoken.core

    readers: set[str] = set()
    for cls in ast.walk(ast.parse(inspect.getsource(tiktoken.core))):
        for fn in getattr(cls, "body", ()):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                    isinstance(n, ast.Attribute) and n.attr == "_mergeable_ranks"
                    for n in ast.walk(fn)):
                readers.add(f"{getattr(cls, 'name', '')}.{fn.name}")
    assert readers == {"Encoding.__init__", "Encoding.__getstate__"}


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_long_text_counts_exactly_in_pieces(name: str) -> None:
    # Long ordinary text is encoded in pieces cut before a space: the count does not change.
    words = ["Hello,", "wörld", "✓", "12345", "naïve", "<|endoftext|>", "a\n\nb", "x  y",
             "(call)", "snake_case", "don't", "\tTab", "日本語のテキスト"]
    rng = random.Random(7)
    text = " ".join(rng.choice(words) for _ in range(20000))
    assert count_text_tokens(text, name) == len(encoding(name).encode_ordinary(text))


def test_a_long_run_without_whitespace_costs_linear_time() -> None:
    # tiktoken alone takes ~4 s on 9 MiB of one word; in pieces it is ~0.1 s per MiB.
    t0 = time.perf_counter()
    assert count_text_tokens("a" * 2**20, "cl100k_base") > 100_000
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    count_text_tokens("a" * 4 * 2**20, "cl100k_base")
    assert time.perf_counter() - t0 < 4 * one * 2 + 0.2  # linear (generous, a shared machine)


def test_output_tally_counts_in_slices_off_the_loop() -> None:
    from llm_gateway.tokens import TALLY_SLICE, OutputTally

    piece = "lorem ipsum dolor sit amet, "
    pieces = [piece] * (5 * TALLY_SLICE // len(piece))
    tally = OutputTally("cl100k_base")
    for p in pieces:
        tally.add(p)
    got = asyncio.run(tally.total())
    exact = count_text_tokens("".join(pieces), "cl100k_base")
    assert exact <= got <= exact + 2 * 6  # a cut between slices may split a word
    tally.discard()
    tally.add("hello world")
    assert tally.count() == got + 2
