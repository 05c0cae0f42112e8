"""The Redis limiter: exact across every worker of every replica, one round trip per request.

One Lua script checks and reserves both buckets atomically with Redis server time (the
replicas' clocks never matter). Both buckets of a tenant live in one hash whose key carries the
tenant as a hash tag, `llmgw:{<tenant>}:buckets`, so the script runs unchanged on Redis Cluster.
The key expires when both buckets would be full again (plus a second): an expired key reads as
full buckets, so expiry never changes an answer and idle tenants cost no memory.

Settles are awaitables the caller runs off the request path. On a standalone Redis every call
goes over `resp.ScriptChannel`, pipelined; on Redis Cluster, through coredis, calls that arrive
while one is being sent are batched into a single non-transactional pipeline.

Lua numbers cross to Redis as integers (fractions truncated), so levels and times are stored
and returned as strings printed with 17 significant digits.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

import coredis
import coredis.exceptions as cx
import coredis.retry
from coredis.connection import TCPLocation
from llm_gateway.limits.base import Decision, LimiterUnavailable, decision
from llm_gateway.limits.resp import Address, ScriptChannel

# KEYS[1]: the tenant's bucket hash. ARGV: mode, rpm_limit, tpm_limit, n.
# "reserve": n = tokens to reserve; returns {allowed, denied_by, retry_after, r, t, never_fits}.
# "settle": n = reserved - actual, added to the token bucket (capped at tpm_limit).
# A missing level means a full bucket; a limit <= 0 (unlimited) leaves its bucket untouched.
# Port of base.decide: keep the two in step.
LUA = """
local key, mode = KEYS[1], ARGV[1]
local rpm, tpm, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function f(x) return string.format('%.17g', x) end
local function level(v, at, cap)
  if cap <= 0 then return 0 end
  v, at = tonumber(v), tonumber(at)
  if v == nil or at == nil then return cap end
  return math.min(cap, v + math.max(0, now - at) * cap / 60)
end
local function full_ms(v, cap)
  if cap <= 0 then return 0 end
  return math.max(0, (cap - v) * 60000 / cap)
end
local s = redis.call('HMGET', key, 'r', 'rt', 't', 'tt')
local r, t = level(s[1], s[2], rpm), level(s[3], s[4], tpm)
if mode == 'settle' then
  t = math.min(tpm, t + n)
  redis.call('HSET', key, 't', f(t), 'tt', f(now))
  local ttl = math.max(redis.call('PTTL', key), full_ms(t, tpm) + 1000)
  redis.call('PEXPIRE', key, math.ceil(ttl))
  return 1
end
local allowed, denied, wait, never = 0, '', 0, 0
if tpm > 0 and n > tpm then
  denied, never = 'tpm', 1
else
  local need_r, need_t = 0, 0
  if rpm > 0 then need_r = math.max(0, 1 - r) * 60 / rpm end
  if tpm > 0 then need_t = math.max(0, n - t) * 60 / tpm end
  if need_r <= 0 and need_t <= 0 then
    allowed = 1
    if rpm > 0 then r = r - 1 end
    if tpm > 0 then t = t - n end
  elseif need_r >= need_t then
    denied, wait = 'rpm', need_r
  else
    denied, wait = 'tpm', need_t
  end
end
if rpm > 0 then redis.call('HSET', key, 'r', f(r), 'rt', f(now)) end
if tpm > 0 then redis.call('HSET', key, 't', f(t), 'tt', f(now)) end
if rpm > 0 or tpm > 0 then
  redis.call('PEXPIRE', key, math.ceil(math.max(full_ms(r, rpm), full_ms(t, tpm)) + 1000))
end
return {allowed, denied, f(wait), f(r), f(t), never}
"""

# What "the store cannot be reached" looks like through coredis; anything else is a bug.
_ERRORS: tuple[type[BaseException], ...] = (
    cx.ConnectionError,  # includes BusyLoadingError, ProtocolError
    cx.ClusterError,
    cx.ClusterDownError,
    cx.ReadOnlyError,  # a failed-over primary that is now a replica
    cx.TryAgainError,
    cx.AuthenticationError,
    TimeoutError,
    OSError,
)

# Entering a cluster client also fails this way when no startup node answers.
_START_ERRORS: tuple[type[BaseException], ...] = (*_ERRORS, cx.RedisClusterError)

# A queued script call: key, args, and the future its caller awaits.
_Call = tuple[str, list[str | int], "asyncio.Future[Any]"]


def bucket_key(tenant_id: str) -> str:
    return f"llmgw:{{{tenant_id}}}:buckets"


class RedisLimiter:
    """`await start()` / `await aclose()` (or `async with`) in one task, e.g. a lifespan:
    coredis 6 ties the connection pool to the task that entered it."""

    def __init__(self, addr: str, *, cluster: bool = False, timeout_s: float = 0.25,
                 lean: bool = True) -> None:
        url = addr if "://" in addr else f"redis://{addr}"
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
        self._script = self._client.register_script(LUA)
        # On a standalone Redis, each call goes over the lean channel (see `resp`); coredis
        # keeps the start-up check and Redis Cluster, where it routes keys to their nodes.
        # (`lean=False` keeps coredis for every call: the benchmark's baseline.)
        address = Address.from_url(url) if lean and not cluster else None
        self._channel = (ScriptChannel(address, LUA, self._script.sha, timeout_s=timeout_s)
                         if address is not None else None)
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
        if self._channel is not None:
            await self._channel.close()
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._entered:
            self._entered = False
            await self._client.__aexit__(None, None, None)

    async def __aenter__(self) -> RedisLimiter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def reserve(self, tenant_id: str, rpm_limit: int, tpm_limit: int,
                      tokens: int) -> Decision:
        res = await self._call(bucket_key(tenant_id), ["reserve", rpm_limit, tpm_limit, tokens])
        allowed, denied, wait, r, t, never = res
        if isinstance(denied, bytes):
            denied = denied.decode()
        return decision(bool(int(allowed)), denied or None, bool(int(never)), float(wait),
                        rpm_limit, float(r), tpm_limit, float(t))

    async def settle(self, tenant_id: str, tpm_limit: int, reserved: int, actual: int) -> None:
        if tpm_limit <= 0 or reserved == actual:
            return
        await self._call(bucket_key(tenant_id), ["settle", 0, tpm_limit, reserved - actual],
                         urgent=False)

    async def _call(self, key: str, args: list[str | int], urgent: bool = True) -> Any:
        """Run the script once. Over the lean channel, in the loop iteration that made the call
        (a settle may wait a few ms for company). Through coredis, with nothing in flight it is
        sent at once; calls made while a batch is in flight wait for it and then go together in
        one pipeline: no added latency when idle, far fewer round trips under load."""
        if self._channel is not None:
            try:
                return await self._channel.call([key], args, urgent=urgent)
            except ConnectionError as exc:
                raise LimiterUnavailable(str(exc)) from None
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
                    results[i] = exc
            if not missing:
                break
            if attempt == 0:
                await self._client.script_load(LUA)
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
