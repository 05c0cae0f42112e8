"""The fake upstream's OpenAI Responses endpoint, driven by the official openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import FakeUpstream

_EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
WORDS8 = "word0 word1 word2 word3 word4 word5 word6 word7"
TOOL = {"type": "function", "name": "get_weather", "strict": False,
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}}}


@pytest.fixture
def control(upstream: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.url) as client:
        client.post("/_control/reset").raise_for_status()
        yield client


@pytest.fixture
def oai(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="x", max_retries=0) as client:
        yield client


def test_text_reply_usage_and_recorded_request(oai: openai.OpenAI,
                                               control: httpx.Client) -> None:
    response = oai.responses.create(model="gpt-4o", instructions="Be very brief.",
                                    input="hello there friend", reasoning={"effort": "low"})
    Response.model_validate(response.model_dump(exclude_unset=True))
    assert (response.object, response.model, response.status) == ("response", "gpt-4o",
                                                                   "completed")
    assert response.output_text == WORDS8
    assert response.usage is not None
    # input: 1 + 3 words + 3 words of instructions; output: 8 words + 2 reasoning tokens
    assert response.usage.model_dump(exclude_unset=True) == {
        "input_tokens": 7, "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
        "output_tokens": 10, "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 17}
    [recorded] = control.get("/_control/requests").json()
    assert (recorded["method"], recorded["path"]) == ("POST", "/v1/responses")
    assert recorded["body"] == {"model": "gpt-4o", "instructions": "Be very brief.",
                                "input": "hello there friend", "reasoning": {"effort": "low"}}


def test_function_call_and_cap(oai: openai.OpenAI, control: httpx.Client) -> None:
    response = oai.responses.create(model="m", input=[{"role": "user", "content": "hi"}],
                                    tools=[TOOL])  # type: ignore[list-item]
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"input": WORDS8}
    capped = oai.responses.create(model="m", input="hi", max_output_tokens=3)
    assert capped.status == "incomplete" and capped.output_text == "word0 word1 word2"
    assert capped.incomplete_details is not None
    assert capped.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("tools", [[], [TOOL]])
def test_stream_events_validate_and_complete(oai: openai.OpenAI, control: httpx.Client,
                                             tools: list[dict[str, object]]) -> None:
    with httpx.Client(base_url=f"{control.base_url}") as raw:
        body = {"model": "m", "input": "hi", "stream": True, "tools": tools}
        text = raw.post("/v1/responses", json=body).text
    frames = [f for f in text.split("\n\n") if f]
    events = []
    for frame in frames:
        head, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        _EVENT.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    with oai.responses.stream(model="m", input="hi", tools=tools) as stream:  # type: ignore[arg-type]
        final = stream.get_final_response()
    if tools:
        assert final.output[0].type == "function_call"
        assert json.loads(final.output[0].arguments) == {"input": WORDS8}
    else:
        assert final.output_text == WORDS8
    assert final.usage is not None and final.usage.output_tokens == 8


def test_status_fault(oai: openai.OpenAI, control: httpx.Client) -> None:
    control.post("/_control/faults", json={"faults": [{"kind": "status", "status": 429}]})
    with pytest.raises(openai.RateLimitError):
        oai.responses.create(model="m", input="hi")
