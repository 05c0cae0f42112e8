"""Turn perf results into tables, target verdicts and perf/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERF_DIR = Path(__file__).resolve().parent
TARGETS = ("direct", "bare", "gateway")


@dataclass
class Result:
    """One k6 run of one scenario against one target."""

    scenario: str
    target: str  # "direct" (the upstream itself), "bare" or "gateway"
    rps: float
    p50: float
    p90: float
    p99: float
    ttfb_p50: float
    max_ms: float
    ok: int
    errors: int
    limited: int
    stalls: int = 0
    ok_small: int = 0
    cpu_us_per_req: float | None = None
    core_util: float | None = None  # server CPU seconds per wall second
    rss_mib: float | None = None  # largest worker
    uss_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    name: str
    passed: bool
    detail: str


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=PERF_DIR).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "commit": commit or "unknown"}


def _find(results: list[Result], scenario: str, target: str) -> Result | None:
    return next((r for r in results if r.scenario == scenario and r.target == target), None)


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def table(results: list[Result]) -> str:
    """Markdown: one row per run, with the added latency over direct and the ratio to bare."""
    head = ("| scenario | target | req/s | p50 ms | p90 ms | p99 ms | +p50 ms | +p99 ms "
            "| x bare req/s | errors | 429s | CPU µs/req | CPU use server/upstream/machine "
            "| RSS MiB/worker (USS) |")
    lines = [head, "|" + "---|" * 14]
    for r in results:
        direct = _find(results, r.scenario, "direct")
        bare = _find(results, r.scenario, "bare")
        added50 = added99 = ratio = None
        if direct is not None and r.target != "direct":
            added50, added99 = r.p50 - direct.p50, r.p99 - direct.p99
        if bare is not None and r.target == "gateway" and bare.rps:
            ratio = r.rps / bare.rps
        mem = "-" if r.rss_mib is None else f"{r.rss_mib:.0f} ({r.uss_mib or 0:.0f})"
        util = " / ".join(_pct(v) for v in (r.core_util, r.extra.get("upstream_util"),
                                             r.extra.get("machine_util")))
        lines.append(
            f"| {r.scenario} | {r.target} | {r.rps:,.0f} | {r.p50:.2f} | {r.p90:.2f} "
            f"| {r.p99:.2f} | {_num(added50, '+.2f')} | {_num(added99, '+.2f')} "
            f"| {_num(ratio, '.2f')} | {r.errors} | {r.limited} "
            f"| {_num(r.cpu_us_per_req, ',.0f')} | {util} | {mem} |")
    return "\n".join(lines)


def ratio_table(results: list[Result]) -> str:
    """Markdown: every gateway number as a ratio to the bare stack's."""
    lines = ["| scenario | req/s | p50 | p99 | CPU/req | RSS/worker |", "|---|---|---|---|---|---|"]
    for g in (r for r in results if r.target == "gateway"):
        b = _find(results, g.scenario, "bare")
        if b is None:
            continue

        def x(a: float | None, c: float | None) -> str:
            return "-" if a is None or not c else f"{a / c:.2f}"

        lines.append(f"| {g.scenario} | {x(g.rps, b.rps)} | {x(g.p50, b.p50)} "
                     f"| {x(g.p99, b.p99)} | {x(g.cpu_us_per_req, b.cpu_us_per_req)} "
                     f"| {x(g.rss_mib, b.rss_mib)} |")
    return "\n".join(lines)


def _at_least(name: str, value: float, floor: float, unit: str) -> Verdict:
    margin = value - floor
    return Verdict(name, value >= floor,
                   f"{value:,.2f}{unit} vs ≥ {floor:,.2f}{unit} (margin {margin:+,.2f}{unit}, "
                   f"{margin / floor:+.0%})")


def _at_most(name: str, value: float, ceiling: float, unit: str) -> Verdict:
    margin = ceiling - value
    return Verdict(name, value <= ceiling,
                   f"{value:,.2f}{unit} vs ≤ {ceiling:,.2f}{unit} (margin {margin:+,.2f}{unit})")


def verdicts(results: list[Result], gateway_cores: int,
             soak: dict[str, Any] | None) -> list[Verdict]:
    """PASS/MISS for each target of issue #7 that this run measured."""
    out: list[Verdict] = []
    for scenario, floor, what in (("nonstream-32", 1500, "non-streaming"),
                                  ("stream-32", 1000, "streaming")):
        g, b = _find(results, scenario, "gateway"), _find(results, scenario, "bare")
        if g is None:
            continue
        out.append(_at_least(f"{what} 32 conns, req/s per gateway core", g.rps / gateway_cores,
                             floor, ""))
        if b is not None and b.rps:
            out.append(_at_least(f"{what} 32 conns, share of bare (goal)", g.rps / b.rps, 0.6, ""))
    for scenario, ceiling, what in (("nonstream-1", 0.5, "non-streaming"),
                                    ("stream-1", 0.8, "streaming")):
        g, d = _find(results, scenario, "gateway"), _find(results, scenario, "direct")
        if g is None or d is None:
            continue
        out.append(_at_most(f"{what} 1 conn, added p50", g.p50 - d.p50, ceiling, " ms"))
        out.append(_at_most(f"{what} 1 conn, added p99", g.p99 - d.p99, 2.0, " ms"))
    # The issue sets the RSS ceiling for the load scenarios and the soak; 1,000 open slow
    # streams hold memory per connection (their RSS is in the table, not held to it).
    rss = [r.rss_mib for r in results if r.target == "gateway" and r.rss_mib is not None
           and r.scenario != "slow-streams"]
    if soak and soak.get("rss_max"):
        rss.append(soak["rss_max"])
    if rss:
        out.append(_at_most("RSS per worker (largest seen, load scenarios and soak)", max(rss),
                            150, " MiB"))
    if soak and soak.get("rss_start"):
        out.append(_at_most(f"RSS flat over a {soak['duration_s']:.0f} s soak at "
                            f"{soak['rate']:.0f} req/s (growth)",
                            soak["growth"] * 100, 5.0, " %"))
        out.append(_at_most("soak errors", soak["errors"], 0, ""))
    slow = _find(results, "slow-streams", "gateway")
    if slow is not None:
        bad = slow.errors + slow.stalls
        out.append(Verdict(f"{slow.extra.get('vus', '?')} slow streams on "
                           f"{slow.extra.get('workers', '?')} workers: no error, no stall",
                           bad == 0 and slow.ok > 0,
                           f"{slow.ok:,} complete, {slow.errors} errors, {slow.stalls} stalls "
                           f"(> {slow.extra.get('stall_ms', 0):.0f} ms), max "
                           f"{slow.max_ms:,.0f} ms"))
    return out


def verdict_lines(vs: list[Verdict]) -> str:
    return "\n".join(f"- **{'PASS' if v.passed else 'MISS'}** {v.name}: {v.detail}" for v in vs)


def markdown(run: dict[str, Any], results: list[Result], vs: list[Verdict]) -> str:
    """The whole report as Markdown."""
    m = run["machine"]
    soak = run.get("soak")
    parts = [
        f"Run {run['started']} ({run['mode']}), commit {m['commit']}: {m['nproc']} CPUs "
        f"({m['cpu']}), Python {m['python']}, Linux {m['kernel']}, k6 {run['k6']}.",
        f"Gateway (all features on: auth, Redis limits, metrics, tracing at "
        f"{run['trace_ratio']:.0%} to a local OTLP sink, usage ledger) and bare proxy: "
        f"{run['placement']}. Upstream: the project's fake upstream, "
        f"{run['chunks']} chunks per stream. {run['duration_s']:.0f} s per run after "
        f"{run['warmup_s']:.0f} s warm-up. Gateway CPU when idle: "
        f"{run.get('gateway_idle_cpu', 0):.1%} of a core; whole machine before the run: "
        f"{run.get('background_cores', 0):.2f} cores busy"
        + (" (**not quiet: other work skews these numbers**)."
           if run.get("background_cores", 0) > 0.15 else "."),
        "", table(results), "", "Gateway / bare stack (1.00 = as fast/small as bare):", "",
        ratio_table(results), "",
    ]
    if soak:
        parts += [f"Soak: {soak['duration_s']:.0f} s at {soak['rate']:.0f} req/s "
                  f"({soak['stream_share']:.0%} streaming), {soak['ok']:,} ok, "
                  f"{soak['errors']} errors; worker RSS {soak['rss_start']:.1f} → "
                  f"{soak['rss_end']:.1f} MiB (max {soak['rss_max']:.1f}, growth "
                  f"{soak['growth']:+.1%}), USS {soak['uss_start']:.1f} → "
                  f"{soak['uss_end']:.1f} MiB.", ""]
    parts += ["Targets (issue #7):", "", verdict_lines(vs), ""]
    return "\n".join(parts)


def write_results_md(text: str) -> Path:
    path = PERF_DIR / "RESULTS.md"
    path.write_text(
        "# Latest perf results\n\n"
        "Written by `just perf` (`perf/run.py`) after a full default run; `perf/out/` keeps "
        "every run's JSON and Markdown. Numbers are from the machine named below — compare "
        "ratios, not absolute values, across machines.\n\n" + text)
    return path
