"""An upstream that is not the bottleneck: Debian's nginx serving fixed OpenAI answers.

nginx cannot branch on the JSON body's `stream` field cheaply, so the route picks the shape by
path: `…/plain/v1/chat/completions` answers a fixed `chat.completion` (with usage) from memory
(`return 200`), `…/stream/v1/chat/completions` a pre-rendered SSE file (the role delta, one
delta per word, the finish chunk, a usage chunk and `data: [DONE]`), chunked like a live stream.
The whole stream leaves in one or two TCP segments, so a relay sees few reads per stream where a
real model's tokens arrive one by one (the `--upstream fake` harness paces nothing either, but
writes one event per write).

    with nginx_upstream(chunks=20) as up:
        up.plain_v1, up.stream_v1, up.master_pid
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 21  # what tiktoken counts for the k6 prompt; the value only has to be sane


@dataclass(frozen=True)
class NginxUpstream:
    url: str
    master_pid: int

    @property
    def plain_v1(self) -> str:
        return f"{self.url}/plain/v1"

    @property
    def stream_v1(self) -> str:
        return f"{self.url}/stream/v1"


def words(chunks: int) -> list[str]:
    """The reply's words, as the project's fake upstream writes them."""
    return [f"word{i}" for i in range(chunks)]


def _usage(chunks: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks,
            "total_tokens": PROMPT_TOKENS + chunks}


def completion_body(model: str, chunks: int) -> str:
    """A `chat.completion` as compact JSON, usage included."""
    message = {"role": "assistant", "content": " ".join(words(chunks)), "refusal": None}
    body = {"id": "chatcmpl-perf0000000000000000000000000", "object": "chat.completion",
            "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": _usage(chunks), "system_fingerprint": None}
    return json.dumps(body, separators=(",", ":"))


def stream_body(model: str, chunks: int) -> str:
    """The SSE stream: role delta, one delta per word, finish chunk, usage chunk, [DONE]."""
    base: dict[str, Any] = {"id": "chatcmpl-perf0000000000000000000000000",
                            "object": "chat.completion.chunk", "created": 1_700_000_000,
                            "model": model, "system_fingerprint": None}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w if i == 0 else f" {w}"}) for i, w in enumerate(words(chunks))]
    events += [chunk({}, "stop"), {**base, "choices": [], "usage": _usage(chunks)}]
    return "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) \
        + "data: [DONE]\n\n"


def config(root: Path, port: int, plain: str) -> str:
    """nginx.conf for one worker, with every path under `root` (no root needed)."""
    if "'" in plain or "$" in plain or "\\" in plain:
        raise ValueError("the plain body must not hold ', $ or \\ (nginx string syntax)")
    temp = root / "tmp"
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server_tokens off;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {root}/www;
    location = /health {{ return 200 'ok'; }}
    location = /plain/v1/chat/completions {{
      default_type application/json;
      return 200 '{plain}';
    }}
    # POST to a static file is a 405; the error page turns it into a GET of the same file.
    # SSI (with nothing to include) drops Content-Length, so the stream goes out chunked.
    location = /stream/v1/chat/completions {{
      default_type text/event-stream;
      chunked_transfer_encoding on;
      ssi on;
      ssi_types text/event-stream;
      error_page 405 =200 $uri;
    }}
  }}
}}
"""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=0.5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def nginx_upstream(port: int, *, model: str, chunks: int) -> Iterator[NginxUpstream]:
    """nginx in the foreground (its master is our child), stopped on exit. CPU affinity is
    inherited: start it inside `pinned(...)`."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None)
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light), or run with "
                           "--upstream fake")
    with tempfile.TemporaryDirectory(prefix="perf-nginx-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # nginx started as root serves as an unprivileged worker user
        (root / "tmp").mkdir()
        target = root / "www" / "stream" / "v1" / "chat" / "completions"
        target.parent.mkdir(parents=True, mode=0o755)
        for d in target.parents:
            if d == root:
                break
            d.chmod(0o755)  # mkdir's mode is masked by the umask
        target.write_text(stream_body(model, chunks))
        conf = root / "nginx.conf"
        conf.write_text(config(root, port, completion_body(model, chunks)))
        url = f"http://127.0.0.1:{port}"
        with open(root / "stderr.log", "w+b") as err:
            proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(root)],
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                deadline = time.monotonic() + 10
                while not _healthy(url):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err.seek(0)
                        raise RuntimeError("nginx did not start: "
                                           + err.read().decode(errors="replace")[-2000:])
                    time.sleep(0.02)  # poll interval while nginx binds
                yield NginxUpstream(url, proc.pid)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its worker
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)
