"""The gateway's process tree: Granian's parent, its worker processes, and the usage writer.

    llm-gateway serve (parent: Granian)
    ├── worker 1..N   GATEWAY_WORKERS (default one per core): the BlackSheep app on uvloop
    └── usage-writer  drains the usage queue into the ledger (restarted if it dies)

The parent prepares what must exist once (data directory, schema, limiter table, admin key,
tokenizer files, the usage queue) before forking, so workers start fast and agree. SIGTERM:
Granian stops accepting, lets in-flight requests and streams finish for up to
GATEWAY_SHUTDOWN_GRACE_S, joins the workers; then the writer drains the queue and the parent
exits 0.
"""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing as mp
import sys
from typing import TYPE_CHECKING, Any

from llm_gateway.settings import ADMIN_KEY_FILE, Settings, make_private, make_private_dir

if TYPE_CHECKING:
    from blacksheep import Application

log = logging.getLogger("llm_gateway")


def load_app(settings: Settings, usage_queue: Any, target: str = "") -> Application:
    """Granian's target loader: runs in each worker and builds that worker's app."""
    from llm_gateway.app import Gateway, build_app
    from llm_gateway.ledger import QueueSink, Spool
    from llm_gateway.limits import make_limiter
    from llm_gateway.store import make_store

    def make_sink(s: Settings) -> QueueSink:
        return QueueSink(usage_queue, Spool(s.data_dir), s.usage_queue_max)

    return build_app(Gateway(settings, make_store, make_limiter, make_sink))


def prepare(settings: Settings) -> Settings:
    """Run once in the parent, before any worker exists."""
    make_private_dir(settings.data_dir)
    make_private(settings.data_dir / ADMIN_KEY_FILE)  # one an older version wrote 0644
    settings, generated = settings.with_admin_key()
    if settings.embedded_store:
        from llm_gateway.store.embedded import EmbeddedStore

        EmbeddedStore.initialize(settings.data_dir)
    if not settings.redis_addr:
        from llm_gateway.limits.embedded import EmbeddedLimiter

        EmbeddedLimiter.reset(settings.data_dir)
    if settings.embedded_store:
        # Never the key itself: logs are shipped and kept where the key must not be.
        path = str(settings.data_dir / ADMIN_KEY_FILE)
        log.info("admin key generated in the file" if generated
                 else "admin key: ADMIN_API_KEY, or the file", extra={"fields": {"path": path}})
    from llm_gateway.tokens import warm_up

    warm_up()
    settle_memory()
    return settings


def settle_memory() -> None:
    """Collect the parent's garbage, then freeze what is left, before anything forks: a worker's
    collections then skip the inherited objects instead of writing to (and so copying) their
    pages. That keeps about 4 MiB per worker shared."""
    gc.collect()
    gc.freeze()


def serve(settings: Settings) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from llm_gateway import logs
    from llm_gateway import observability as obs
    from llm_gateway.workers.usage_writer import WriterSupervisor

    mp.set_start_method("fork", force=True)
    logs.setup(settings.log_level)
    make_private_dir(settings.data_dir)  # before the metrics directory creates it 0755
    obs.prepare_parent(settings)  # before anything forks, and before prometheus_client loads
    settings = prepare(settings)
    # Unbounded: put() never blocks a worker's event loop (FACTS §3).
    usage_queue = mp.get_context("fork").Queue()
    writer = WriterSupervisor(settings, usage_queue)
    writer.start()
    server = Granian(
        "llm_gateway.workers.server:load_app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        workers=settings.workers,
        workers_kill_timeout=max(1, int(settings.shutdown_grace_s)),
        respawn_failed_workers=True,
        # Granian's default backlog (1024) caps each worker at backlog/workers connections in
        # flight; long-lived streams need far more (1,000 slow streams stalled with it).
        backlog=4096,
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig=logs.dict_config(settings.log_level),
    )

    @server.on_shutdown
    def _drain_usage() -> None:  # runs after every worker has been joined
        writer.stop(timeout_s=60)

    store = ("embedded " + str(settings.data_dir) if settings.embedded_store
             else f"dynamodb {settings.dynamodb_table_name}")
    log.info("llm-gateway starting", extra={"fields": {
        "url": f"http://{settings.host}:{settings.port}", "workers": settings.workers,
        "store": store, "limits": "redis " + settings.redis_addr if settings.redis_addr
        else "embedded", "metrics": settings.metrics_enabled,
        "tracing": settings.tracing_enabled}})
    server.serve(target_loader=functools.partial(load_app, settings, usage_queue))
    log.info("llm-gateway stopped")
    sys.exit(0)
