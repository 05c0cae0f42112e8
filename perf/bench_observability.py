"""What observability costs: requests/s with metrics and tracing on vs off, same run.

Starts one fake upstream, a throwaway OTLP/HTTP sink (its own process: accepts and discards),
and five gateways side by side on the embedded store:

    off        GATEWAY_METRICS=false, no OTLP endpoint, LOG_LEVEL=WARNING
    metrics    Prometheus multiprocess metrics only
    +tracing   metrics and OpenTelemetry spans exported to the sink (batch, 100 ms)
    +tracing 10%  the same, sampling 10% of traces (OTEL_TRACES_SAMPLER, read by the SDK)
    +logs      all of it plus the per-request JSON log line (LOG_LEVEL=INFO)

then drives them in interleaved rounds (so drift on a shared machine hits all alike) with
non-streaming and streaming chat completions, and prints the best round of each.

    python perf/bench_observability.py [--requests 2000] [--concurrency 32] [--workers 1]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_gateway import drive

from tests.conftest import fake_upstream_process, gateway_process
from tests.procs import free_port

CONFIGS: dict[str, dict[str, str]] = {
    "off": {"GATEWAY_METRICS": "false", "LOG_LEVEL": "WARNING"},
    "metrics": {"GATEWAY_METRICS": "true", "LOG_LEVEL": "WARNING"},
    "+tracing": {"GATEWAY_METRICS": "true", "LOG_LEVEL": "WARNING", "OTLP": "1"},
    "+tracing 10%": {"GATEWAY_METRICS": "true", "LOG_LEVEL": "WARNING", "OTLP": "1",
                     "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                     "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    "+logs": {"GATEWAY_METRICS": "true", "LOG_LEVEL": "INFO", "OTLP": "1"},
}


def sink(port: int) -> None:
    class Discard(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return None

    ThreadingHTTPServer(("127.0.0.1", port), Discard).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    otlp_port = free_port()
    otlp = mp.get_context("spawn").Process(target=sink, args=(otlp_port,), daemon=True)
    otlp.start()
    best: dict[tuple[str, str], dict[str, float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        fake = stack.enter_context(fake_upstream_process(chunks=20))
        gateways = {}
        for name, cfg in CONFIGS.items():
            env = {k: v for k, v in cfg.items() if k != "OTLP"}
            if "OTLP" in cfg:
                env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                        "OTEL_BSP_SCHEDULE_DELAY": "100"}
            gw = stack.enter_context(gateway_process(Path(tmp) / name.replace(' ', '_'),
                                                     GATEWAY_WORKERS=str(args.workers), **env))
            gw.put_model("bench", {"provider": "openai", "base_url": fake.openai_base,
                                   "model": "bench"})
            gateways[name] = (gw, gw.create_tenant("bench")["api_key"])
        for _ in range(args.rounds):
            for stream in (False, True):
                kind = "stream" if stream else "non-stream"
                body = orjson.dumps({"model": "bench", "stream": stream,
                                     "messages": [{"role": "user", "content": "hello " * 20}]})
                for name, (gw, key) in gateways.items():
                    auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
                    r = uvloop.run(drive(f"{gw.base_url}/chat/completions", auth, body,
                                         args.requests, args.concurrency))
                    prev = best.get((kind, name))
                    if prev is None or r["rps"] > prev["rps"]:
                        best[(kind, name)] = r
    otlp.terminate()
    otlp.join(5)
    print(f"workers={args.workers} concurrency={args.concurrency} requests={args.requests} "
          f"rounds={args.rounds} (best round shown)")
    print(f"{'scenario':24} {'req/s':>8} {'vs off':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    for kind in ("non-stream", "stream"):
        off = best[(kind, "off")]["rps"]
        for name in CONFIGS:
            r = best[(kind, name)]
            print(f"{kind + ' ' + name:24} {r['rps']:8.0f} {r['rps'] / off:7.2f} "
                  f"{r['p50']:7.2f} {r['p99']:7.2f} {r['errors']:6.0f}")


if __name__ == "__main__":
    main()
