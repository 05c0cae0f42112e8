"""Added latency per endpoint: /v1/chat/completions and /v1/messages through the gateway, on an
openai route and an anthropic route, next to the fake upstream called directly.

One connection, N sequential non-stream requests per case (after a warm-up), so each number is
one request's path through the gateway with nothing queued behind it. Prints p50 and p99 and
the gateway's added p50/p99 over the direct call to the upstream endpoint the route reaches.

    python perf/bench_endpoints.py [--requests 500] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.conftest import fake_upstream_process, gateway_process

CHAT = {"messages": [{"role": "user", "content": "hello there, how are you"}], "max_tokens": 8}
MESSAGES = {**CHAT, "system": "Be terse."}


def timed(client: httpx.Client, url: str, body: dict[str, object], headers: dict[str, str],
          n: int) -> tuple[float, float]:
    data = orjson.dumps(body)
    for _ in range(50):
        client.post(url, content=data, headers=headers).raise_for_status()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.post(url, content=data, headers=headers)
        times.append(time.perf_counter() - t)
        r.raise_for_status()
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.99)] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp, fake_upstream_process() as up, \
            gateway_process(Path(tmp), GATEWAY_WORKERS=str(args.workers)) as gw:
        gw.put_model("gpt", {"provider": "openai", "base_url": up.openai_base, "model": "up"})
        gw.put_model("claude", {"provider": "anthropic", "base_url": up.url,
                                "model": "fake-claude", "api_key": "sk-ant"})
        key = gw.create_tenant("bench", rpm_limit=1_000_000, tpm_limit=1_000_000_000)["api_key"]
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        ant = {"x-api-key": "sk-ant", "anthropic-version": "2023-06-01",
               "Content-Type": "application/json"}
        with httpx.Client(timeout=30) as c:  # one keep-alive connection per base URL
            direct_chat = timed(c, f"{up.url}/v1/chat/completions", {"model": "up", **CHAT},
                                auth, n)
            direct_msgs = timed(c, f"{up.url}/v1/messages", {"model": "fake-claude",
                                                             **MESSAGES}, ant, n)
            cases = [
                ("chat.completions -> openai", "/v1/chat/completions", "gpt", CHAT, direct_chat),
                ("chat.completions -> anthropic", "/v1/chat/completions", "claude", CHAT,
                 direct_msgs),
                ("messages -> anthropic (bytes)", "/v1/messages", "claude", MESSAGES,
                 direct_msgs),
                ("messages -> openai (translated)", "/v1/messages", "gpt", MESSAGES,
                 direct_chat),
            ]
            print(f"{n} sequential non-stream requests, 1 connection, {args.workers} worker(s)")
            print(f"{'direct /v1/chat/completions':34s} p50 {direct_chat[0]:6.2f} ms  "
                  f"p99 {direct_chat[1]:6.2f} ms")
            print(f"{'direct /v1/messages':34s} p50 {direct_msgs[0]:6.2f} ms  "
                  f"p99 {direct_msgs[1]:6.2f} ms")
            for name, path, model, body, direct in cases:
                p50, p99 = timed(c, f"{gw.url}{path}", {"model": model, **body}, auth, n)
                print(f"{name:34s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  added p50 "
                      f"{p50 - direct[0]:+6.2f} ms  p99 {p99 - direct[1]:+6.2f} ms")


if __name__ == "__main__":
    main()
