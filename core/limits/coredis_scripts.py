"""The limiter script through coredis: the Redis Cluster path (and the benchmark's baseline).

coredis routes each key to its node and follows MOVED/ASK, which a single connection cannot.
Calls that arrive while a batch is in flight wait for it and then go together in one
non-transactional pipeline: no added latency when idle, far fewer round trips under load.
Imported only when needed: coredis adds about 13 MiB to a worker.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

import coredis
import coredis.exceptions as cx
import coredis.retry
from coredis.connection import TCPLocation
from llm_gateway.limits import replies
from llm_gateway.limits.base import LimiterUnavailable

# What "the store cannot be reached" looks like through coredis. coredis turns the error replies
# it knows into classes (and drops their prefix from the text): those meaning "not now" are
# here. Any other error reply is a plain ResponseError that keeps its prefix, which
# `replies.translate` reads (OOM, BUSY, MASTERDOWN...). Anything else is a bug.
_ERRORS: tuple[type[BaseException], ...] = (
    cx.ConnectionError,  # includes BusyLoadingError (LOADING), ProtocolError
    cx.ClusterError,
    cx.ClusterDownError,
    cx.ReadOnlyError,  # a failed-over primary that is now a replica
    cx.TryAgainError,
    cx.AuthenticationError,  # NOAUTH, WRONGPASS
    cx.AuthorizationError,  # NOPERM
    TimeoutError,
    OSError,
)

# Entering a cluster client also fails this way when no startup node answers.
_START_ERRORS: tuple[type[BaseException], ...] = (*_ERRORS, cx.RedisClusterError)

# A queued script call: key, args, and the future its caller awaits.
_Call = tuple[str, list[str | int], "asyncio.Future[Any]"]


class CoredisScripts:
    """`await start()` / `await aclose()` in one task, e.g. a lifespan: coredis 6 ties the
    connection pool to the task that entered it."""

    def __init__(self, url: str, script: str, *, cluster: bool, timeout_s: float) -> None:
        # No retries and short timeouts: a dead Redis must surface as LimiterUnavailable within
        # a request's budget, and the caller decides whether to fail open or closed.
        options: dict[str, Any] = {
            "decode_responses": True,
            "connect_timeout": timeout_s,
            "stream_timeout": timeout_s,
            "retry_policy": coredis.retry.NoRetryPolicy(),
        }
        self._client: Any = (_cluster_client(url, options) if cluster
                             else coredis.Redis.from_url(url, **options))
        self._source = script
        self._script = self._client.register_script(script)
        self._entered = False
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._client.__aenter__()
        except _START_ERRORS as exc:
            raise LimiterUnavailable(f"redis: {exc!r}") from None
        self._entered = True

    async def aclose(self) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._entered:
            self._entered = False
            await self._client.__aexit__(None, None, None)

    async def call(self, key: str, args: list[str | int]) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((key, args, done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_queued())
        return await done

    async def _send_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                results = await self._run(batch)
            except _ERRORS as exc:
                results = [LimiterUnavailable(f"redis: {exc!r}")] * len(batch)
            except cx.ResponseError as exc:
                results = [replies.translate(str(exc))] * len(batch)
            except Exception as exc:  # a bug: still wake every waiter, with the error
                results = [exc] * len(batch)
            for (_, _, done), result in zip(batch, results, strict=True):
                if done.done():  # the waiter was cancelled
                    continue
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def _run(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:  # the Script object reloads the script itself after NOSCRIPT
            key, args, _ = batch[0]
            return [await self._script(keys=[key], args=args)]
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(2):
            # Plain EVALSHA: a pipeline given the Script object would first send SCRIPT EXISTS,
            # a second round trip on every batch.
            async with self._client.pipeline(transaction=False, raise_on_error=False) as pipe:
                sent = [pipe.evalsha(self._script.sha, keys=[batch[i][0]], args=batch[i][1])
                        for i in todo]
            missing = []
            for i, request in zip(todo, sent, strict=True):
                try:
                    results[i] = await request
                except cx.NoScriptError:
                    missing.append(i)  # not run: safe to send again
                except _ERRORS as exc:
                    results[i] = LimiterUnavailable(f"redis: {exc!r}")
                except cx.ResponseError as exc:
                    results[i] = replies.translate(str(exc))
            if not missing:
                break
            if attempt == 0:
                await self._client.script_load(self._source)
            else:
                for i in missing:
                    results[i] = LimiterUnavailable("redis: script missing after reload")
            todo = missing
        return results


def _cluster_client(url: str, options: dict[str, Any]) -> Any:
    # RedisCluster.from_url hands the pool dict nodes, which coredis 6.9 deprecates (a warning,
    # an error under our test settings); startup nodes as TCPLocation are the supported form.
    u = urlsplit(url)
    return coredis.RedisCluster(
        startup_nodes=[TCPLocation(u.hostname or "127.0.0.1", u.port or 6379)],
        username=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
        ssl=u.scheme == "rediss",
        **options,
    )
