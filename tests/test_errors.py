"""Every client-facing error: OpenAI's shape, the right status, code and param."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FakeUpstream, Gateway, unique
from tests.procs import free_port


@pytest.fixture(scope="module")
def setup(gateway: Gateway, upstream: FakeUpstream) -> dict[str, str]:
    ok, denied, dead = unique("ok"), unique("denied"), unique("dead")
    for name, base in ((ok, upstream.openai_base), (denied, upstream.openai_base),
                       (dead, f"http://127.0.0.1:{free_port()}/v1")):
        gateway.put_model(name, {"provider": "openai", "base_url": base, "model": "m"})
    key = gateway.create_tenant(unique("t"), allowed_models=[ok, dead])["api_key"]
    return {"key": key, "ok": ok, "denied": denied, "dead": dead}


def _post(gateway: Gateway, key: str | None, body: Any = None, content: bytes | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return httpx.post(f"{gateway.base_url}/chat/completions", json=body, content=content,
                      headers=h, timeout=20)


def _error(r: httpx.Response, status: int, code: str | None = None,
           param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert "Traceback" not in r.text
    return err  # type: ignore[no-any-return]


def test_auth_errors(gateway: Gateway, setup: dict[str, str]) -> None:
    body = {"model": setup["ok"], "messages": [{"role": "user", "content": "x"}]}
    _error(_post(gateway, None, body), 401, "missing_api_key")
    err = _error(_post(gateway, "sk-wrong-key-1234", body), 401, "invalid_api_key")
    assert err["type"] == "authentication_error"
    with openai.OpenAI(base_url=gateway.base_url, api_key="sk-nope", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model=setup["ok"], messages=[{"role": "user", "content": "x"}])


def test_model_errors(gateway: Gateway, setup: dict[str, str]) -> None:
    msg = [{"role": "user", "content": "x"}]
    _error(_post(gateway, setup["key"], {"model": setup["denied"], "messages": msg}), 403,
           "model_not_allowed", "model")
    _error(_post(gateway, setup["key"], {"model": "no-such-model", "messages": msg}), 404,
           "model_not_found", "model")
    with openai.OpenAI(base_url=gateway.base_url, api_key=setup["key"], max_retries=0) as c:
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model=setup["denied"], messages=msg)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="no-such-model", messages=msg)  # type: ignore[arg-type]


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "missing_required_parameter", "model"),
    ({"model": "MODEL"}, "missing_required_parameter", "messages"),
    ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, "invalid_type", "model"),
    ({"model": "MODEL", "messages": "hello"}, "invalid_type", "messages"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "x"}]}, "invalid_value",
     "messages[0].role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     "invalid_type", "stream"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
     "invalid_value", "max_tokens"),
    ([1, 2, 3], "invalid_json", None),
])
def test_bad_bodies(gateway: Gateway, setup: dict[str, str], body: Any, code: str,
                    param: str | None) -> None:
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body["model"] = setup["ok"]
    err = _error(_post(gateway, setup["key"], body), 400, code, param)
    assert err["type"] == "invalid_request_error"


def test_invalid_json_and_depth(gateway: Gateway, setup: dict[str, str]) -> None:
    _error(_post(gateway, setup["key"], content=b'{"model": "x", "messages": [',
                 headers={"content-type": "application/json"}), 400, "invalid_json")
    deep: Any = "leaf"
    for _ in range(60):
        deep = {"d": deep}
    body = {"model": setup["ok"], "messages": [{"role": "user", "content": "x"}], "meta": deep}
    _error(_post(gateway, setup["key"], body), 400, "json_too_deep")
    shallow: Any = "leaf"
    for _ in range(45):
        shallow = [shallow]
    body["meta"] = shallow
    assert _post(gateway, setup["key"], body).status_code == 200


def test_body_too_large(gateway: Gateway, setup: dict[str, str]) -> None:
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024)
    big += b'"}]}'
    _error(_post(gateway, setup["key"], content=big,
                 headers={"content-type": "application/json"}), 413, "payload_too_large")

    def chunks() -> Any:  # no Content-Length: refused while streaming in, not after
        for _ in range(11):
            yield b"a" * (1024 * 1024)

    r = httpx.post(f"{gateway.base_url}/chat/completions", content=chunks(), timeout=20,
                   headers={"Authorization": f"Bearer {setup['key']}"})
    _error(r, 413, "payload_too_large")


def test_upstream_unreachable_and_timeout(gateway: Gateway, fresh_upstream: FakeUpstream,
                                          setup: dict[str, str]) -> None:
    msg = [{"role": "user", "content": "x"}]
    _error(_post(gateway, setup["key"], {"model": setup["dead"], "messages": msg}), 502,
           "upstream_unreachable")
    fresh_upstream.faults({"kind": "hang"}, {"kind": "hang"})  # the attempt and its one retry
    err = _error(_post(gateway, setup["key"], {"model": setup["ok"], "messages": msg}), 504,
                 "upstream_timeout")
    assert err["type"] == "timeout"


def test_unknown_paths_and_methods(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.url}/v1/nothing-here")
    _error(r, 404, "unknown_url")
    r = httpx.get(f"{gateway.base_url}/chat/completions")
    _error(r, 405, "method_not_allowed")
