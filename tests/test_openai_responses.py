"""The OpenAI Responses passthrough: the upstream request, and usage read from JSON and SSE."""

from __future__ import annotations

import json
import random
from functools import partial
from typing import Any

import pytest
from llm_gateway.domain import Target
from llm_gateway.errors import UpstreamError
from llm_gateway.providers.openai_responses import (
    TAIL_BYTES,
    ResponsesPassthroughStream,
    parse_responses_response,
    responses_request,
    responses_usage,
)
from llm_gateway.providers.responses_to_chat import ChatToResponsesStream
from llm_gateway.providers.sse import MAX_FRAME_BYTES
from llm_gateway.tokens import OutputTally, count_text_tokens

from tests.test_responses_to_chat import REQUEST, SCENARIOS, START, chunk, frames

TARGET = Target("openai", "https://api.openai.local/v1/", "gpt-5", api_key="sk")
USAGE = {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 12},
         "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4},
         "total_tokens": 39}

COUNT = partial(OutputTally, "cl100k_base")


def test_request_patches_only_the_model() -> None:
    body = {"model": "gpt-5", "input": "hi", "previous_response_id": "resp_1", "store": True,
            "background": True}
    raw = json.dumps(body).encode()
    req = responses_request(TARGET, body, raw, api_key="sk")
    assert req.url == "https://api.openai.local/v1/responses"
    assert req.headers == {"content-type": "application/json", "accept-encoding": "identity",
                           "authorization": "Bearer sk"}
    assert req.body is raw
    routed = {**body, "model": "route-name"}
    req = responses_request(TARGET, routed, b"unused", api_key=None)
    assert json.loads(req.body) == body and "authorization" not in req.headers
    assert routed["model"] == "route-name"


def test_usage() -> None:
    usage = responses_usage({"usage": USAGE})
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens,
            usage.reasoning_tokens, usage.reported) == (30, 9, 12, 4, True)
    usage = responses_usage({"usage": {"input_tokens": 3, "output_tokens": 2}})
    assert (usage.cached_tokens, usage.reasoning_tokens, usage.reported) == (0, 0, True)
    usage = responses_usage({"usage": {**USAGE, "input_tokens_details": {
        "cached_tokens": 99}, "output_tokens_details": {"reasoning_tokens": -1}}})
    assert (usage.cached_tokens, usage.reasoning_tokens) == (30, 0)  # never more than the whole
    assert responses_usage({"usage": {"input_tokens": 2**60, "output_tokens": 1}}
                           ).input_tokens == 2**53


@pytest.mark.parametrize("data", [
    None, [], {}, {"usage": None}, {"usage": "x"}, {"usage": {"input_tokens": 1}},
    {"usage": {"input_tokens": "1", "output_tokens": 2}},
    {"usage": {"input_tokens": True, "output_tokens": 2}},
    {"usage": {"input_tokens": 1.5, "output_tokens": 2}},
])
def test_unreported_usage(data: Any) -> None:
    assert responses_usage(data).reported is False


def test_parse_response() -> None:
    body = json.dumps({"id": "resp_1", "object": "response", "usage": USAGE,
                       "output": []}).encode()
    content, usage = parse_responses_response(body)
    assert content is body and usage.reported and usage.generated == ()
    body = json.dumps({"output": [
        {"type": "message", "content": [{"type": "output_text", "text": "Hi"},
                                        {"type": "refusal", "refusal": "no"}, 5]},
        {"type": "function_call", "name": "f", "arguments": "{}"}, "junk",
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hidden"}]}]}
    ).encode()
    _, usage = parse_responses_response(body)
    assert not usage.reported and usage.generated == ("Hi", "no", "f", "{}")
    for bad in (b"<html>", b"[1]"):
        with pytest.raises(UpstreamError):
            parse_responses_response(bad)


def responses_sse(source: bytes) -> bytes:
    """A realistic Responses stream: what the chat translator makes of a chat stream."""
    tr = ChatToResponsesStream("gpt-5", REQUEST, COUNT)
    return tr.feed(source) + tr.finish()


def relay(pieces: list[bytes]) -> tuple[bytes, ResponsesPassthroughStream]:
    tr = ResponsesPassthroughStream(COUNT)
    out = b"".join(tr.feed(p) for p in pieces) + tr.finish()
    return out, tr


@pytest.mark.parametrize("name", ["text", "parallel_calls", "length"])
def test_stream_relays_bytes_untouched_and_finds_usage(name: str) -> None:
    source = responses_sse(SCENARIOS[name])
    for variant in (source, source.replace(b"\n", b"\r\n")):
        cuts = [[variant]] + [[variant[:at], variant[at:]] for at in range(1, len(variant), 5)]
        for pieces in cuts:
            out, tr = relay(pieces)
            assert out == variant
            usage = tr.usage()
            assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens,
                    usage.reasoning_tokens, usage.reported) == (20, 9, 6, 4, True)
            assert tr.error is None and tr.generated.count() == 0


def test_stream_data_only_frames_and_random_splits() -> None:
    source = responses_sse(SCENARIOS["text_then_calls"])
    data_only = b"\n\n".join(f.split(b"\n", 1)[1] for f in source.split(b"\n\n") if f) + b"\n\n"
    rng = random.Random(7)
    for variant in (data_only, source.replace(b"\n", b"\r")):
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(variant)), rng.randint(1, 40)))
            pieces = [variant[a:b] for a, b in zip([0, *cuts], [*cuts, len(variant)],
                                                   strict=True)]
            out, tr = relay(pieces)
            assert out == variant and tr.usage().output_tokens == 9


def test_stream_huge_final_event_keeps_only_its_tail() -> None:
    text = "word " * 200_000  # 1 MB of output, repeated whole in response.completed
    source = responses_sse(frames(START, chunk({"content": text}), chunk(finish="stop"),
                                  chunk(usage={"prompt_tokens": 5, "completion_tokens": 7,
                                               "total_tokens": 12}), "[DONE]"))
    tr = ResponsesPassthroughStream(COUNT)
    largest: dict[bytes | None, int] = {}
    for at in range(0, len(source), 65536):
        assert tr.feed(source[at:at + 65536]) == source[at:at + 65536]
        kept = tr._body
        largest[tr._kind] = max(largest.get(tr._kind, 0), len(kept) if kept else 0)
    tr.finish()
    # The 1 MB delta is read whole (up to MAX_FRAME_BYTES), the 1 MB done events not at all,
    # and of the final event (the whole output again) only its tail.
    assert largest[b"response.output_text.delta"] <= MAX_FRAME_BYTES
    assert largest[b"response.output_text.done"] == 0
    assert 0 < largest[b"response.completed"] <= 2 * TAIL_BYTES + 65536
    assert (tr.usage().input_tokens, tr.usage().output_tokens) == (5, 7)


def test_cut_stream_tallies_the_deltas() -> None:
    source = responses_sse(SCENARIOS["text_then_calls"])
    cut = source[: source.index(b"event: response.completed")]
    _, tr = relay([cut[i:i + 9] for i in range(0, len(cut), 9)])
    assert not tr.usage().reported
    expected = "Hel" + "lo, \"wörld\" ✓\n" + "{\"q\": \"ca" + "ts\", \"n\": 2}" + "{}"
    assert tr.generated.count() == count_text_tokens(expected, "cl100k_base")


def test_failed_and_error_events_are_recorded() -> None:
    error = {"error": {"message": "boom", "type": "server_error"}}
    failed = responses_sse(frames(START, chunk({"content": "Hi"}), error))
    out, tr = relay([failed])
    assert out == failed and isinstance(tr.error, UpstreamError)
    assert not tr.usage().reported
    event = b'event: error\ndata: {"type":"error","sequence_number":3,"message":"x"}\n\n'
    _, tr = relay([event])
    assert isinstance(tr.error, UpstreamError)


def test_hostile_frames_never_crash() -> None:
    junk = [b"event: response.completed\ndata: {bad\n\n",
            b'event: response.completed\ndata: {"response": {"usage": "x"}}\n\n',
            b'data: {"type":"response.output_text.delta","delta":5}\n\n',
            b"event: response.output_text.delta\ndata: " + b"x" * (2 << 20) + b"\n\n",
            b"\n\n\n\n: comment\n\n", b'data: {"usage":{"input_tokens":\n\n']
    out, tr = relay(junk)
    assert out == b"".join(junk) and not tr.usage().reported
    tail = b'event: response.completed\ndata: {"type":"response.completed","response":{' + (
        b'"output":"' + b"y" * (3 * TAIL_BYTES) + b'",'
        b'"usage":{"input_tokens":1,"output_tokens":2,"note":"}{\\"}"},"user":null}}\n\n')
    _, tr = relay([tail[i:i + 4096] for i in range(0, len(tail), 4096)])
    assert (tr.usage().input_tokens, tr.usage().output_tokens) == (1, 2)


def test_stream_tells_the_response_id_once_at_every_split() -> None:
    source = responses_sse(SCENARIOS["text"])
    created = json.loads(source.split(b"\n\n")[0].split(b"data: ", 1)[1])
    for at in range(1, len(source), 3):
        seen: list[str] = []
        tr = ResponsesPassthroughStream(COUNT, seen.append)
        assert tr.feed(source[:at]) + tr.feed(source[at:]) + tr.finish() == source
        assert seen == [created["response"]["id"]], at


def test_stream_fail_numbers_its_error_event_after_the_relayed_ones() -> None:
    source = responses_sse(SCENARIOS["text"])
    frames = [f for f in source.split(b"\n\n") if f]
    whole = b"\n\n".join(frames[:3]) + b"\n\n"
    for cut in (whole, whole + frames[3][:20]):  # between events, and inside one
        tr = ResponsesPassthroughStream(COUNT)
        out = tr.feed(cut) + tr.fail(UpstreamError("gone", code="upstream_disconnected"))
        assert out.startswith(cut)
        tail = out[len(cut):]
        assert tail.startswith(b"event: error\n" if cut is whole else b"\n\nevent: error\n")
        event = json.loads(tail.split(b"data: ", 1)[1])
        assert event == {"type": "error", "code": "upstream_disconnected", "message": "gone",
                         "param": None, "sequence_number": 3 if cut is whole else 4}
        assert tr.error is not None and tr.error.code == "upstream_disconnected"
