"""The per-feature attribution of py-spy samples (`perf/features.py`).

    .venv/bin/python -m pytest -q perf/test_features.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import features as f

DIRS = ("/repo/core/", "/repo/workers/")
SITE = "/repo/.venv/lib/python3.11/site-packages"
STD = "/usr/local/lib/python3.11"
LOOP = f"serve ({SITE}/granian/server.py:10);handle ({SITE}/blacksheep/server/app.py:20)"


def stack(*frames: str, count: int = 1) -> str:
    return ";".join((LOOP, *frames)) + f" {count}"


def test_innermost_known_module_wins() -> None:
    raw = "\n".join([
        stack("chat (/repo/core/pipeline.py:5)", "check (/repo/core/limits/embedded.py:9)",
              count=3),
        stack("chat (/repo/core/pipeline.py:5)", "authenticate (/repo/core/auth.py:4)",
              "get (/repo/core/store/embedded.py:7)", count=2),
        stack("chat (/repo/core/pipeline.py:5)", f"post ({SITE}/aiohttp/client.py:1)",
              f"write ({STD}/asyncio/streams.py:3)"),
        stack("finish (/repo/core/observability.py:9)", f"info ({STD}/logging/__init__.py:1)",
              "format (/repo/core/logs.py:3)"),
    ])
    prof = f.attribute(raw, DIRS)
    assert prof.total == 7
    assert prof.samples == {f.LIMITER: 3, f.AUTH: 2, f.UPSTREAM: 1, f.LOG: 1}


def test_transparent_stdlib_counts_for_its_caller() -> None:
    raw = "\n".join([
        stack("count (/repo/core/tokens.py:1)", f"wrapper ({STD}/functools.py:2)",
              f"__exit__ ({STD}/contextlib.py:3)"),
        stack("reserve (/repo/core/limiting.py:1)", "__init__ (<string>:2)"),
    ])
    assert f.attribute(raw, DIRS).samples == {f.TOKENS: 1, f.LIMITER: 1}


def test_loop_only_stack_is_framework_and_unknown_module_is_listed() -> None:
    raw = "\n".join([
        f"run ({STD}/asyncio/base_events.py:1);_run_once ({STD}/asyncio/base_events.py:2) 4",
        stack("renamed (/repo/core/brand_new_module.py:12)", count=2),
        f"mystery ({SITE}/unheard_of/x.py:1) 1",
        "garbage line without count",
    ])
    prof = f.attribute(raw, DIRS)
    assert prof.samples == {f.FRAMEWORK: 4, f.OTHER_GW: 2, f.OTHER: 1}
    assert prof.unattributed == {"renamed (gateway:brand_new_module.py)": 2,
                                 "mystery (unheard_of/x.py)": 1}
    assert prof.top_functions(1)[f.FRAMEWORK] == {"_run_once (asyncio/base_events.py)": 4}


def test_bare_proxy_splits_into_parsing_and_relay() -> None:
    raw = "\n".join([stack("chat_completions (/repo/perf/bare_proxy.py:50)", count=2),
                     stack("relay (/repo/perf/bare_proxy.py:60)", count=3)])
    assert f.attribute(raw, DIRS).samples == {f.PARSING: 2, f.RELAY: 3}


def test_paths_map_by_suffix_under_the_package_dirs() -> None:
    assert f.classify("/repo/core/providers/openai.py", DIRS) == f.RELAY
    assert f.classify("/repo/core/limits/redis.py", DIRS) == f.LIMITER
    assert f.classify("/repo/workers/usage_writer.py", DIRS) == f.LEDGER
    assert f.classify(f"{SITE}/prometheus_client/values.py", DIRS) == f.METRICS
    assert f.classify(f"{SITE}/opentelemetry/sdk/trace/__init__.py", DIRS) == f.TRACING
    assert f.classify(f"{STD}/multiprocessing/queues.py", DIRS) == f.LEDGER
    assert f.classify(f"{STD}/asyncio/events.py", DIRS) is None
    assert f.classify("/repo/perf/bare_proxy.py", DIRS) == f.PARSING
    # an installed (not editable) gateway
    site = (f"{SITE}/llm_gateway/",)
    assert f.classify(f"{SITE}/llm_gateway/tokens.py", site) == f.TOKENS
    assert f.classify(f"{SITE}/llm_gateway/workers/usage_writer.py", site) == f.LEDGER
