"""Prometheus metrics, aggregated across Granian's worker processes (multiprocess mode).

Import this module only in a process where PROMETHEUS_MULTIPROC_DIR is already set:
prometheus_client picks its value class (in-memory or mmap'd file) when it is imported. The
parent sets and wipes the directory before any worker exists (`observability.prepare_parent`),
and nothing on the parent's import path imports this module.

Labels stay bounded: tenant, model, provider and the configured target names, HTTP status
codes and a fixed set of reasons; never request ids or keys.

Gauges and their multiprocess modes (one mmap file per worker PID; chosen on purpose):
- `llm_gateway_circuit_state{target}` livemax: breakers are per worker, so the worst state a
  live worker sees (0 closed, 1 half-open, 2 open); a dead worker's files are dropped because
  each worker calls `mark_process_dead` on stop.
- `llm_gateway_usage_queue_depth`, `llm_gateway_usage_spooled_records` mostrecent: one shared
  queue and one spool, so the latest observation wins, whichever process made it (worker at
  scrape time, or the usage writer through the setters).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as mp

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("llm_gateway_requests",
                   "Model requests by endpoint and outcome (HTTP status).",
                   ("tenant", "model", "provider", "status", "endpoint"))
DURATION = Histogram("llm_gateway_request_duration_seconds",
                     "Time from request to the last byte of the response.",
                     ("model", "provider", "endpoint"), buckets=DURATION_BUCKETS)
TTFT = Histogram("llm_gateway_ttft_seconds", "Time to the first byte of a streamed response.",
                 ("model", "provider"), buckets=TTFT_BUCKETS)
TOKENS = Counter("llm_gateway_tokens", "Tokens used, as reported or counted.",
                 ("tenant", "model", "type"))
COST = Counter("llm_gateway_cost", "Cost of the tokens used, at the route's prices.",
               ("tenant", "model"))
RATE_LIMITED = Counter("llm_gateway_rate_limited", "Requests refused by a tenant limit.",
                       ("tenant", "limit"))
UPSTREAM_ERRORS = Counter("llm_gateway_upstream_errors",
                          "Failed or skipped upstream attempts, by reason.",
                          ("provider", "target", "reason"))
ATTEMPTS = Counter("llm_gateway_upstream_attempts", "Upstream attempts, by outcome.",
                   ("provider", "target", "outcome"))
LIMITER_ERRORS = Counter("llm_gateway_limiter_errors", "Calls to the rate limiter that failed.")
CIRCUIT = Gauge("llm_gateway_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                ("target",), multiprocess_mode="livemax")
QUEUE_DEPTH = Gauge("llm_gateway_usage_queue_depth",
                    "Batches of usage records (one per worker per 2 ms at most) handed to "
                    "the writer but not yet taken.",
                    multiprocess_mode="mostrecent")
SPOOLED = Gauge("llm_gateway_usage_spooled_records",
                "Usage records in the spool, not yet written to the ledger.",
                multiprocess_mode="mostrecent")

SPOOL_ERRORS = Counter("llm_gateway_usage_spool_errors",
                       "Spool writes that failed (the records were kept and retried).")
RECORDS_REJECTED = Counter("llm_gateway_usage_records_rejected",
                           "Usage records the store can never accept, moved to quarantine.")

# A mostrecent gauge is only exposed once set with a timestamp, and the writer may not have
# reported yet: a 0 stamped at the epoch shows it, and loses to any real observation.
SPOOLED._value.set(0.0, timestamp=1.0)


class _Children:
    """`metric.labels(*values)` cached per label tuple: the request path skips the label
    validation and the lock inside prometheus_client."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


requests = _Children(REQUESTS)
duration = _Children(DURATION)
ttft = _Children(TTFT)
tokens = _Children(TOKENS)
cost = _Children(COST)
rate_limited = _Children(RATE_LIMITED)
upstream_errors = _Children(UPSTREAM_ERRORS)
attempts = _Children(ATTEMPTS)
circuit = _Children(CIRCUIT)


def render() -> bytes:
    """The exposition of every worker's files; a fresh registry per scrape (FACTS §4)."""
    registry = CollectorRegistry()
    mp.MultiProcessCollector(registry)
    return generate_latest(registry)


def mark_process_dead() -> None:
    """Drop this worker's live* gauge files: Granian gives the parent no child-exit hook."""
    mp.mark_process_dead(os.getpid())
