"""Prometheus metrics at GET /metrics: known traffic through a 2-worker gateway, each request on
a new connection (so both workers serve some), then exact counters and histogram counts per
label set, the same whichever worker answers the scrape."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FakeUpstream, Gateway, gateway_process
from tests.procs import free_port

MSG = [{"role": "user", "content": "count these words please"}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def scrape(gw: Gateway) -> Samples:
    # A new connection each time: the scrape lands on either worker.
    r = httpx.get(f"{gw.url}/metrics", headers={"Connection": "close"}, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def client(gw: Gateway, key: str) -> openai.OpenAI:
    no_keepalive = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0,
                         http_client=no_keepalive)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_process(tmp_path_factory.mktemp("metrics"), GATEWAY_BREAKER_FAIL_MAX="1",
                         GATEWAY_RETRIES_PER_TARGET="0") as gateway:
        yield gateway


def test_counters_and_histograms_after_known_traffic(gw: Gateway,
                                                     upstream: FakeUpstream) -> None:
    gw.put_model("m", {"provider": "openai", "base_url": upstream.openai_base, "model": "up"},
                 input_price_per_mtok=1.0, output_price_per_mtok=2.0)
    dead = {"provider": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
            "model": "gone"}
    gw.put_model("dead", dead)
    dead_target = f"openai:{dead['base_url']}#gone"
    free = client(gw, gw.create_tenant("free")["api_key"])
    tight = client(gw, gw.create_tenant("tight", rpm_limit=2)["api_key"])

    tokens_in = tokens_out = 0
    for n in (1, 2, 3):
        r = free.chat.completions.create(model="m", messages=MSG, max_tokens=n)  # type: ignore[arg-type]
        assert r.usage is not None
        tokens_in += r.usage.prompt_tokens
        tokens_out += r.usage.completion_tokens
    for n in (4, 5):
        stream = free.chat.completions.create(  # type: ignore[call-overload]
            model="m", messages=MSG, max_tokens=n, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                tokens_in += chunk.usage.prompt_tokens
                tokens_out += chunk.usage.completion_tokens
    limited = 0
    for _ in range(4):
        try:
            r = tight.chat.completions.create(model="m", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            assert r.usage is not None
            tight_in, tight_out = r.usage.prompt_tokens, r.usage.completion_tokens
        except openai.RateLimitError:
            limited += 1
    assert limited == 2
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-wrong").chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        free.chat.completions.create(model="no-such-model", messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as failed:
        free.chat.completions.create(model="dead", messages=MSG)  # type: ignore[arg-type]
    dead_status = str(failed.value.status_code)

    def req(tenant: str, model: str, provider: str, status: str,
            endpoint: str = "chat.completions") -> float | None:
        return value(got, "llm_gateway_requests_total", tenant=tenant, model=model,
                     provider=provider, status=status, endpoint=endpoint)

    # The last stream's request_finished runs as its generator ends: poll, never sleep.
    deadline = time.monotonic() + 10
    while True:
        got = scrape(gw)
        if req("free", "m", "openai", "200") == 5 or time.monotonic() > deadline:
            break
    assert req("free", "m", "openai", "200") == 5
    assert req("tight", "m", "openai", "200") == 2
    assert req("tight", "m", "", "429") == 2
    assert req("", "", "", "401") == 1
    assert req("free", "", "", "404") == 1  # the unknown model name is not a label
    assert req("free", "dead", "openai", dead_status) == 1
    assert not any(dict(k[1]).get("model") == "no-such-model" for k in got)

    def count(name: str, **labels: str) -> float | None:
        return value(got, f"{name}_count", **labels)

    assert count("llm_gateway_request_duration_seconds", model="m", provider="openai",
                 endpoint="chat.completions") == 7
    assert count("llm_gateway_request_duration_seconds", model="m", provider="",
                 endpoint="chat.completions") == 2
    assert count("llm_gateway_ttft_seconds", model="m", provider="openai") == 2  # streams only
    assert value(got, "llm_gateway_ttft_seconds_bucket", model="m", provider="openai",
                 le="+Inf") == 2
    assert value(got, "llm_gateway_rate_limited_total", tenant="tight", limit="rpm") == 2
    assert value(got, "llm_gateway_tokens_total", tenant="free", model="m",
                 type="input") == tokens_in
    assert value(got, "llm_gateway_tokens_total", tenant="free", model="m",
                 type="output") == tokens_out
    assert value(got, "llm_gateway_tokens_total", tenant="tight", model="m",
                 type="input") == 2 * tight_in
    assert value(got, "llm_gateway_tokens_total", tenant="tight", model="m",
                 type="output") == 2 * tight_out
    assert value(got, "llm_gateway_cost_total", tenant="free", model="m") == pytest.approx(
        (tokens_in * 1.0 + tokens_out * 2.0) / 1e6)
    ok_target = f"openai:{upstream.openai_base}#up"
    assert value(got, "llm_gateway_upstream_attempts_total", provider="openai",
                 target=ok_target, outcome="success") == 7
    assert value(got, "llm_gateway_upstream_attempts_total", provider="openai",
                 target=dead_target, outcome="unreachable") == 1
    assert value(got, "llm_gateway_upstream_errors_total", provider="openai",
                 target=dead_target, reason="unreachable") == 1
    assert value(got, "llm_gateway_circuit_state", target=dead_target) == 2  # open
    assert value(got, "llm_gateway_circuit_state", target=ok_target) == 0
    assert value(got, "llm_gateway_limiter_errors_total") == 0
    assert value(got, "llm_gateway_usage_queue_depth") is not None
    assert value(got, "llm_gateway_usage_spooled_records") is not None

    # Every scrape, on whichever worker, sums both workers' files.
    counters = {k: v for k, v in got.items() if k[0].endswith(("_total", "_count"))}
    for _ in range(4):
        again = scrape(gw)
        assert {k: again[k] for k in counters} == counters
    files = list((gw.data_dir / f"prometheus-{gw.env['SERVER_PORT']}").glob("counter_*.db"))
    # both workers served (and counted) requests; the usage writer keeps a file of its own
    assert len(files) == 3


def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    with gateway_process(tmp_path, GATEWAY_METRICS="false") as gw:
        r = httpx.get(f"{gw.url}/metrics")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_url"
    assert not list(tmp_path.glob("prometheus-*"))
