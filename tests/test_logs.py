"""JSON logs: one line per request with its fields, startup and shutdown lines, and never a key,
a prompt or a completion anywhere in what the gateway's processes write."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import FakeUpstream, Gateway, gateway_process, unique

PROMPT = "my diary says zanzibar-pelican-7731 at noon"
UPSTREAM_KEY = "sk-upstream-secret-5f1e0c9d"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def lines(gw: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.output().splitlines() if line.startswith("{")]


def request_lines(gw: Gateway, n: int) -> list[dict[str, Any]]:
    """Poll: a stream's line is written when its generator ends, after the client is done."""
    deadline = time.monotonic() + 10
    while len(found := [x for x in lines(gw) if x["msg"] == "request"]) < n:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)  # poll interval
    return found


def test_request_lines_and_no_secrets(tmp_path: Path, upstream: FakeUpstream) -> None:
    with gateway_process(tmp_path, LOG_LEVEL="INFO") as gw:
        gw.put_model("logged", {"provider": "openai", "base_url": upstream.openai_base,
                                "model": "up", "api_key": UPSTREAM_KEY})
        tenant_key = gw.create_tenant("acme", rpm_limit=3)["api_key"]
        bad_key = "sk-not-a-real-key-31337"
        msgs = [{"role": "user", "content": PROMPT}]
        with openai.OpenAI(base_url=gw.base_url, api_key=tenant_key, max_retries=0) as client:
            r = client.chat.completions.create(
                model="logged", messages=msgs, max_tokens=3,  # type: ignore[arg-type]
                extra_headers={"X-Request-ID": "log-1",
                               "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
            stream = client.chat.completions.create(  # type: ignore[call-overload]
                model="logged", messages=msgs, max_tokens=2, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, extra_headers={"X-Request-ID": "log-2"})
            completion = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            client.chat.completions.create(model="logged", messages=msgs, max_tokens=1)  # type: ignore[arg-type]
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(
                    model="logged", messages=msgs,  # type: ignore[arg-type]
                    extra_headers={"X-Request-ID": "log-4"})
        with openai.OpenAI(base_url=gw.base_url, api_key=bad_key, max_retries=0) as client, \
                pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="logged", messages=msgs)  # type: ignore[arg-type]

        found = request_lines(gw, 5)
        assert r.usage is not None
        by_id = {x.get("client_request_id"): x for x in found}
        one = by_id["log-1"]
        assert one["request_id"].startswith("req_")
        assert one["trace_id"] == TRACE  # tracing off: the client's trace id, still logged
        assert one["tenant"] == "acme" and one["model"] == "logged"
        assert one["provider"] == "openai"
        assert one["target"] == f"openai:{upstream.openai_base}#up"
        assert one["status"] == 200 and one["error"] is None and one["stream"] is False
        assert one["latency_ms"] > 0 and one["attempts"] == 1
        assert (one["input_tokens"], one["output_tokens"]) == (r.usage.prompt_tokens, 3)
        two = by_id["log-2"]
        assert two["stream"] is True and two["status"] == 200 and two["output_tokens"] == 2
        assert 0 < two["ttft_ms"] <= two["latency_ms"]
        four = by_id["log-4"]
        assert four["status"] == 429 and four["error"] == "rate_limit_exceeded"
        assert four["provider"] is None and four["attempts"] == 0
        (rejected,) = [x for x in found if x["status"] == 401]
        assert rejected["tenant"] == "" and rejected["request_id"].startswith("req_")
        assert all(x["level"] == "INFO" and x["logger"] == "llm_gateway.request" for x in found)

        starts = [x for x in lines(gw) if x["msg"] == "worker started"]
        assert len({x["pid"] for x in starts}) == 2
        assert any(x["msg"] == "llm-gateway starting" and x["workers"] == 2 for x in lines(gw))

        assert gw.proc is not None
        gw.proc.terminate()
        assert gw.proc.wait(30) == 0
        output = gw.output()
        msgs_seen = [x["msg"] for x in lines(gw)]
        assert msgs_seen.count("worker stopped") == 2
        assert msgs_seen[-1] == "llm-gateway stopped"

    assert all(line.startswith("{") for line in output.splitlines() if line.strip()), output
    assert completion == "word0 word1"
    for secret in (tenant_key, tenant_key[-12:], bad_key, UPSTREAM_KEY, gw.admin_key,
                   PROMPT, "zanzibar", "word0", "word1"):
        assert secret not in output, secret


def test_log_level_hides_request_lines(gateway: Gateway, fresh_upstream: FakeUpstream) -> None:
    """The shared gateway runs with LOG_LEVEL=WARNING: no per-request lines."""
    model = unique("quiet")
    gateway.put_model(model, {"provider": "openai", "base_url": fresh_upstream.openai_base,
                              "model": "q"})
    key = gateway.create_tenant(unique("t"))["api_key"]
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as client:
        client.chat.completions.create(model=model, max_tokens=1,
                                       messages=[{"role": "user", "content": "x"}])
    assert '"msg":"request"' not in gateway.output()
