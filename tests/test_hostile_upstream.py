"""Issue 12, items 3, 5 and 6 as they touch the upstream path: bounded memory per request
(model names, non-stream and error bodies), secrets in upstream errors, redirects, and timeouts
that mean what they say (non-stream headers, breakers, stalled request bodies).

One single-worker gateway serves the module, so a worker's peak memory and its breakers can be
read; each test has its own hostile upstream (its own breaker)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from llm_gateway.catalog import _Cache
from llm_gateway.providers.anthropic import AnthropicProvider
from llm_gateway.providers.openai import map_openai_error

from tests.conftest import Gateway, gateway_process, unique
from tests.hostile_upstream import hostile_upstream, openai_completion, sse

MIB = 1024 * 1024
MSG = [{"role": "user", "content": "hi"}]
SECRET = "postgres://admin:hunter2@db.internal:5432/prod"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_process(tmp_path_factory.mktemp("gw-up"), GATEWAY_WORKERS="1",
                         GATEWAY_FIRST_BYTE_TIMEOUT_S="1", GATEWAY_STREAM_IDLE_TIMEOUT_S="1",
                         GATEWAY_REQUEST_TIMEOUT_S="5", GATEWAY_BODY_READ_TIMEOUT_S="2",
                         GATEWAY_BREAKER_FAIL_MAX="3") as g:
        yield g


@pytest.fixture(scope="module")
def key(gw: Gateway) -> str:
    return str(gw.create_tenant(unique("t"))["api_key"])


def _chat(gw: Gateway, key: str, model: str, *, stream: bool = False,
          timeout: float = 30) -> httpx.Response:
    body = {"model": model, "messages": MSG, "stream": stream}
    return httpx.post(f"{gw.base_url}/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


def _route(gw: Gateway, base_url: str, provider: str = "openai") -> str:
    model = unique("m")
    gw.put_model(model, {"provider": provider, "base_url": base_url, "model": "m"})
    return model


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            children = (task / "children").read_text().split()
            out += [int(c) for c in children]
            todo += [int(c) for c in children]
    return out


def _peak_rss_mib(gw: Gateway) -> dict[int, float]:
    """Each gateway process's peak resident memory so far (VmHWM), in MiB."""
    assert gw.proc is not None
    peaks = {}
    for pid in _descendants(gw.proc.pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = int(line.split()[1]) / 1024
    return peaks


def _growth_mib(before: dict[int, float], after: dict[int, float]) -> float:
    return max(after[pid] - before.get(pid, 0.0) for pid in after)


# Item 3: model names.

def test_long_model_name_refused_before_lookup_and_messages_stay_short(
        gw: Gateway, key: str) -> None:
    r = _chat(gw, key, "m" * 257)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "model"
    r = _chat(gw, key, "x" * 256)  # as long as a route name may be: looked up, not found
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400
    before = _peak_rss_mib(gw)
    for i in range(150):
        r = _chat(gw, key, f"{i}-" + "n" * MIB)
        assert r.status_code == 400 and len(r.content) < 1024, r.content[:300]
    # 150 unknown names of 1 MiB once kept 158 MiB resident in the worker.
    assert _growth_mib(before, _peak_rss_mib(gw)) < 60
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as c:
        r = c.get("/v1/models/" + "y" * 4000)
        assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400
    with gw.admin() as c:
        r = c.delete("/admin/models/" + "z" * 4000)
        assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400
        r = c.post("/admin/tenants", json={"tenant_id": unique("t"), "u" * 5000: 1})
        err = r.json()["error"]
        assert r.status_code == 422 and len(err["message"]) < 400 and len(err["param"]) < 300


def test_name_cache_is_bounded_in_length() -> None:
    cache: _Cache[object] = _Cache()
    for i in range(150):
        cache.put(f"{i}-" + "n" * MIB, None)
    assert sum(map(len, cache.entries)) <= 4 * MIB
    assert f"149-{'n' * MIB}" in cache.entries  # the newest entry is kept


# Item 3: upstream bodies.

def test_non_stream_body_over_limit_is_502_and_reading_stops(gw: Gateway, key: str) -> None:
    written: list[int] = []
    big = json.dumps(openai_completion(content="x" * 48 * MIB)).encode()

    async def declared(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big, content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:
        # 256 MiB without Content-Length, made as it goes: only reading can stop it.
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        sent = 0
        try:
            await resp.write(b'{"choices":[{"message":{"content":"')
            for _ in range(256):
                await resp.write(b"x" * MIB)
                sent += MIB
        except (ConnectionError, RuntimeError):
            pass
        written.append(sent)
        return resp

    for handler in (declared, chunked):
        with hostile_upstream(handler) as up:
            model = _route(gw, up.openai_base)
            before = _peak_rss_mib(gw)
            r = _chat(gw, key, model, timeout=60)
            grew = _growth_mib(before, _peak_rss_mib(gw))
            assert r.status_code == 502, (handler.__name__, r.status_code, len(r.content))
            assert r.json()["error"]["code"] == "upstream_response_too_large"
            assert grew < 100, (handler.__name__, grew)
            assert len(up.received) == 1  # not retried: the same body would come back
    deadline = time.monotonic() + 10
    while not written and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval
    # The gateway stopped reading near 32 MiB; the sockets' buffers hold some more.
    assert written and written[0] < 96 * MIB, written


def test_error_body_is_read_to_64_kib_and_its_message_not_relayed(gw: Gateway,
                                                                  key: str) -> None:
    async def huge_500(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=500, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            await resp.write(b'{"error": {"message": "' + SECRET.encode())
            for _ in range(20):
                await resp.write(b"x" * MIB)
            await resp.write(b'"}}')
        except (ConnectionError, RuntimeError):
            pass
        return resp

    with hostile_upstream(huge_500) as up:
        r = _chat(gw, key, _route(gw, up.openai_base), timeout=60)
    assert r.status_code == 502 and len(r.content) < 1024, len(r.content)
    assert "hunter2" not in r.text


# Item 5: upstream error messages.

@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_5xx_message_generic_4xx_message_capped(gw: Gateway, key: str, provider: str) -> None:
    status = 500

    async def fail(request: web.Request) -> web.StreamResponse:
        message = SECRET if status >= 500 else "bad temperature " + "q" * 5000
        etype = "api_error" if status >= 500 else "invalid_request_error"
        return web.json_response({"type": "error", "error": {"type": etype,
                                                             "message": message}},
                                 status=status)

    with hostile_upstream(fail) as up:
        base = up.openai_base if provider == "openai" else up.url
        model = _route(gw, base, provider)
        r = _chat(gw, key, model)
        assert r.status_code == 502 and "hunter2" not in r.text, r.text
        assert "500" in r.json()["error"]["message"]
        status = 400
        r = _chat(gw, key, model)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "bad temperature qqq" in message
    assert 1024 <= len(message) < 1100


def test_errors_inside_a_stream_are_not_relayed(gw: Gateway, key: str) -> None:
    frame = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}

    async def openai_stream(request: web.Request) -> web.StreamResponse:
        return await sse(request, [b"data: " + json.dumps(frame).encode() + b"\n\n",
                                   b'data: {"error": {"message": "' + SECRET.encode()
                                   + b'", "type": "server_error"}}\n\n'])

    async def anthropic_stream(request: web.Request) -> web.StreamResponse:
        start = {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 0}}}
        error = {"type": "error", "error": {"type": "api_error", "message": SECRET}}
        return await sse(request, [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                                   for e in (start, error)])

    for provider, handler in (("openai", openai_stream), ("anthropic", anthropic_stream)):
        with hostile_upstream(handler) as up:
            base = up.openai_base if provider == "openai" else up.url
            r = _chat(gw, key, _route(gw, base, provider), stream=True)
        assert r.status_code == 200 and '"error"' in r.text, r.text
        assert "hunter2" not in r.text, (provider, r.text)


def test_map_error_units() -> None:
    err = map_openai_error(503, json.dumps({"error": {"message": SECRET}}).encode(), {})
    assert "hunter2" not in err.message and "503" in err.message
    err = map_openai_error(422, json.dumps({"error": {"message": "m" * 9000,
                                                      "code": "c" * 9000}}).encode(), {})
    assert len(err.message) < 1100 and err.code is not None and len(err.code) < 100
    for status in (500, 502, 529):
        body = json.dumps({"error": {"type": "overloaded_error", "message": SECRET}}).encode()
        assert "hunter2" not in AnthropicProvider().map_error(status, body, {}).message


# Item 5: redirects.

def test_redirect_is_not_followed(gw: Gateway, key: str) -> None:
    async def elsewhere(request: web.Request) -> web.StreamResponse:
        return web.json_response(openai_completion())

    with hostile_upstream(elsewhere) as other:
        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(f"{other.openai_base}/chat/completions")

        with hostile_upstream(redirect) as up:
            r = _chat(gw, key, _route(gw, up.openai_base))
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_redirect"
            assert len(up.received) == 1  # not retried on the same target
        assert other.received == []  # the prompt never reached the other origin


# Item 6: timeouts.

def test_non_stream_waits_for_headers_up_to_the_request_timeout(gw: Gateway,
                                                                key: str) -> None:
    async def slow_headers(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)  # longer than first-byte (1 s), shorter than request (5 s)
        return web.json_response(openai_completion(content="late"))

    with hostile_upstream(slow_headers) as up:
        model = _route(gw, up.openai_base)
        r = _chat(gw, key, model)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "late"
        assert len(up.received) == 1
        # A stream still has only the first-byte timeout to start.
        r = _chat(gw, key, model, stream=True)
        assert r.status_code == 504, r.text


def test_breaker_counts_a_timed_out_request_once(gw: Gateway, key: str) -> None:
    """fail_max is 3 and each request makes 2 attempts: 2 slow requests leave the breaker
    closed, the third opens it."""
    slow = True

    async def handler(request: web.Request) -> web.StreamResponse:
        if slow:
            await asyncio.sleep(3)  # past the 1 s first-byte timeout
        frame = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
        return await sse(request, [b"data: " + json.dumps(frame).encode() + b"\n\n",
                                   b"data: [DONE]\n\n"])

    with hostile_upstream(handler) as up:
        model = _route(gw, up.openai_base)
        for i in range(3):
            r = _chat(gw, key, model, stream=True)
            assert r.status_code == 504, (i, r.text)
        assert len(up.received) == 6  # every request made both its attempts
        slow = False
        r = _chat(gw, key, model, stream=True)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_circuit_open"


def stall_body(gw: Gateway, key: str, wait_s: float,
               path: str = "/v1/chat/completions") -> tuple[bytes, float]:
    """POST headers and the start of a 1000-byte body, then nothing: what the gateway answers
    within `wait_s`, and how long it took."""
    port = int(gw.url.rsplit(":", 1)[1])
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"X-Admin-Key: {gw.admin_key}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{\"model\": ")
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(head.encode())
        t0 = time.monotonic()
        while b"}}" not in reply.partition(b"\r\n\r\n")[2]:  # the error JSON is complete
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            reply += data
        return reply, time.monotonic() - t0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/tenants"])
def test_stalled_request_body_gets_408(gw: Gateway, key: str, path: str) -> None:
    reply, waited = stall_body(gw, key, 12, path)
    assert reply.startswith(b"HTTP/1.1 408"), (reply[:200], waited)
    assert waited < 10
    body = reply.partition(b"\r\n\r\n")[2]
    err = json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "request_timeout")


def test_settings_defaults() -> None:
    from llm_gateway.settings import Settings

    s = Settings.from_env({})
    assert (s.max_response_bytes, s.body_read_timeout_s) == (32 * MIB, 30.0)
    s = Settings.from_env({"GATEWAY_MAX_RESPONSE_BYTES": "1000",
                           "GATEWAY_BODY_READ_TIMEOUT_S": "2.5"})
    assert (s.max_response_bytes, s.body_read_timeout_s) == (1000, 2.5)
