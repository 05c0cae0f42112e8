"""The gateway's process tree: Granian's parent, its worker processes, and the usage writer.

    llm-gateway serve (parent: Granian)
    ├── worker 1..N  (GATEWAY_WORKERS, default one per core): BlackSheep app on uvloop
    └── usage-writer (drains the usage queue into the ledger; started in issue 4's module)

The parent prepares everything that must exist once (data directory, schema, admin key, the
tokenizer files) before forking, so workers start fast and agree. SIGTERM: Granian stops
accepting, lets in-flight requests and streams finish for up to GATEWAY_SHUTDOWN_GRACE_S, then
the parent exits 0.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import sys

from blacksheep import Application
from llm_gateway.app import Gateway, build_app
from llm_gateway.limits import Limiter
from llm_gateway.settings import Settings
from llm_gateway.store.base import Store
from llm_gateway.store.embedded import EmbeddedStore

log = logging.getLogger("llm_gateway")


def make_store(settings: Settings) -> Store:
    if settings.embedded_store:
        return EmbeddedStore(settings.data_dir)
    from llm_gateway.store.dynamodb import DynamoDBStore

    return DynamoDBStore(settings)


def make_limiter(settings: Settings) -> Limiter | None:
    if settings.redis_addr:
        from llm_gateway.limits.redis import RedisLimiter

        return RedisLimiter(settings.redis_addr, cluster=settings.redis_cluster)
    from llm_gateway.limits.embedded import EmbeddedLimiter

    return EmbeddedLimiter(settings.data_dir)


def load_app(settings: Settings, target: str = "") -> Application:
    """Granian's target loader: runs in each worker and builds that worker's app."""
    return build_app(Gateway(settings, make_store, make_limiter))


def prepare(settings: Settings) -> Settings:
    """Run once in the parent, before any worker exists."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.embedded_store:
        EmbeddedStore.initialize(settings.data_dir)
    if not settings.redis_addr:
        from llm_gateway.limits.embedded import EmbeddedLimiter

        EmbeddedLimiter.reset(settings.data_dir)
    settings, generated = settings.with_admin_key()
    if generated:
        print(f"Generated ADMIN_API_KEY (kept in {settings.data_dir / 'admin_api_key'}):",
              flush=True)
        print(f"    {settings.admin_api_key}", flush=True)
    elif settings.embedded_store and settings.admin_api_key:
        print(f"Admin key: {settings.data_dir / 'admin_api_key'} "
              "(or the ADMIN_API_KEY you set)", flush=True)
    from llm_gateway.tokens import warm_up

    warm_up()
    return settings


def serve(settings: Settings) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    mp.set_start_method("fork", force=True)
    settings = prepare(settings)
    server = Granian(
        "llm_gateway.workers.server:load_app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        workers=settings.workers,
        workers_kill_timeout=max(1, int(settings.shutdown_grace_s)),
        log_level=LogLevels(settings.log_level.lower()),
        respawn_failed_workers=True,
    )
    print(f"llm-gateway listening on http://{settings.host}:{settings.port} "
          f"with {settings.workers} worker(s), store: "
          f"{'embedded ' + str(settings.data_dir) if settings.embedded_store else 'dynamodb'}",
          flush=True)
    server.serve(target_loader=functools.partial(load_app, settings))
    sys.exit(0)
