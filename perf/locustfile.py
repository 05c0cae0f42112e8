"""Locust load for exploratory or distributed runs against a running gateway (or the bare proxy,
or an upstream directly): chat completions, a share of them streamed, 429s reported apart.

    PERF_API_KEY=sk-... PERF_MODEL=bench PERF_STREAM_SHARE=0.25 \\
        .venv/bin/locust -f perf/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 32 -r 32 -t 30s --only-summary

Distributed: the same file with `--master` on one machine and `--worker --master-host=...` on
the others. `perf/run.py` (k6) is the reference harness; this is for poking around.
"""

from __future__ import annotations

import json
import os
import random

from locust import FastHttpUser, task

API_KEY = os.environ.get("PERF_API_KEY", "sk-perf")
MODEL = os.environ.get("PERF_MODEL", "bench")
STREAM_SHARE = float(os.environ.get("PERF_STREAM_SHARE", "0.25"))
MIN_EVENTS = int(os.environ.get("PERF_MIN_EVENTS", "1"))
PROMPT = " ".join(["hello"] * 20)


def _body(stream: bool) -> bytes:
    return json.dumps({"model": MODEL, "stream": stream, "max_tokens": 64,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()


BODIES = {False: _body(False), True: _body(True)}
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


class ChatUser(FastHttpUser):
    """One connection per user, sending requests back to back."""

    @task
    def chat(self) -> None:
        stream = random.random() < STREAM_SHARE
        name = "chat stream" if stream else "chat"
        with self.client.post("/v1/chat/completions", data=BODIES[stream], headers=HEADERS,
                              name=name, catch_response=True) as r:
            if r.status_code == 429:
                r.failure("429 rate limited")  # listed apart from other failures by name
            elif r.status_code != 200:
                r.failure(f"status {r.status_code}")
            elif stream and not _complete_stream(r.text or ""):
                r.failure("incomplete stream")
            else:
                r.success()


def _complete_stream(text: str) -> bool:
    return text.endswith("data: [DONE]\n\n") and text.count("data:") >= MIN_EVENTS
