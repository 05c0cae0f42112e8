"""The Redis limiter: exact across every worker of every replica, one round trip per request.

One Lua script checks and reserves both buckets atomically with Redis server time (the
replicas' clocks never matter). Both buckets of a tenant live in one hash whose key carries the
tenant as a hash tag, `llmgw:{<tenant>}:buckets`, so the script runs unchanged on Redis Cluster.
The key expires when both buckets would be full again (plus a second): an expired key reads as
full buckets, so expiry never changes an answer and idle tenants cost no memory.

Settles are awaitables the caller runs off the request path. A settle waits up to 5 ms for
its tenant's next reserve, which carries it (one script call for both); else it is sent alone.
On a standalone Redis every call goes over `resp.ScriptChannel`, pipelined, and coredis is
never imported; on Redis Cluster calls go through coredis (`coredis_scripts`), which routes
each key to its node.

Lua numbers cross to Redis as integers (fractions truncated), so levels and times are stored
and returned as strings printed with 17 significant digits.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Protocol

from llm_gateway.limits import replies
from llm_gateway.limits.base import Decision, LimiterUnavailable, decision
from llm_gateway.limits.resp import Address, ReplyError, ScriptChannel

# KEYS[1]: the tenant's bucket hash. ARGV: mode, rpm_limit, tpm_limit, n[, refund].
# "reserve": n = tokens to reserve, after adding `refund` (earlier requests' reserved - actual,
# carried along instead of a call of their own) to the token bucket, capped at tpm_limit;
# returns {allowed, denied_by, retry_after, r, t, never_fits}.
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
local refund = tonumber(ARGV[5]) or 0
if tpm > 0 and refund ~= 0 then t = math.min(tpm, t + refund) end
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

# How long a settle waits for the tenant's next reserve to carry it before it is sent alone.
REFUND_WAIT_S = 0.005


# /readyz runs the script on this key, outside every tenant's `llmgw:{...}:buckets`: a write
# through the same script, so OOM, READONLY or BUSY show there as they would on a request.
HEALTH_KEY = "llmgw:health"


def bucket_key(tenant_id: str) -> str:
    return f"llmgw:{{{tenant_id}}}:buckets"


class _Scripts(Protocol):
    async def start(self) -> None: ...

    async def call(self, key: str, args: list[str | int]) -> Any: ...

    async def aclose(self) -> None: ...


class _Lean:
    """The standalone path: the script over one pipelined RESP connection."""

    def __init__(self, address: Address, timeout_s: float) -> None:
        sha = hashlib.sha1(LUA.encode()).hexdigest()
        self._channel = ScriptChannel(address, LUA, sha, timeout_s=timeout_s)

    async def start(self) -> None:
        try:
            await self._channel.ping()
        except ConnectionError as exc:
            raise LimiterUnavailable(str(exc)) from None

    async def call(self, key: str, args: list[str | int]) -> Any:
        try:
            return await self._channel.call([key], args)
        except ConnectionError as exc:
            raise LimiterUnavailable(str(exc)) from None
        except ReplyError as exc:
            raise replies.translate(str(exc)) from None

    async def aclose(self) -> None:
        await self._channel.close()


class RedisLimiter:
    """`await start()` / `await aclose()` (or `async with`) in one task, e.g. a lifespan."""

    def __init__(self, addr: str, *, cluster: bool = False, timeout_s: float = 0.25,
                 lean: bool = True) -> None:
        url = addr if "://" in addr else f"redis://{addr}"
        # `lean=False` sends every call through coredis: the benchmark's baseline.
        address = Address.from_url(url) if lean and not cluster else None
        if address is not None:
            self._scripts: _Scripts = _Lean(address, timeout_s)
        else:
            from llm_gateway.limits.coredis_scripts import CoredisScripts

            self._scripts = CoredisScripts(url, LUA, cluster=cluster, timeout_s=timeout_s)
        self._refunds: dict[str, _Refund] = {}
        self._refund_timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        await self._scripts.start()

    async def aclose(self) -> None:
        if self._refund_timer is not None:
            self._refund_timer.cancel()
            self._send_refunds()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self._scripts.aclose()

    async def ping(self) -> None:
        """A settle of nothing on HEALTH_KEY: one script call, with the calls' own timeout."""
        await self._scripts.call(HEALTH_KEY, ["settle", 0, 1, 0])

    async def __aenter__(self) -> RedisLimiter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def reserve(self, tenant_id: str, rpm_limit: int, tpm_limit: int,
                      tokens: int) -> Decision:
        key = bucket_key(tenant_id)
        refund = self._refunds.pop(key, None)
        args: list[str | int] = ["reserve", rpm_limit, tpm_limit, tokens]
        if refund is not None:
            args.append(refund.tokens)
            if not self._refunds and self._refund_timer is not None:
                # Nothing left to send alone: no wake-up for an empty flush.
                self._refund_timer.cancel()
                self._refund_timer = None
        try:
            res = await self._scripts.call(key, args)
        except LimiterUnavailable as exc:
            if refund is not None:
                refund.failed(exc)
            raise
        finally:
            # Sent (or lost with the connection) even if this caller was cancelled meanwhile.
            if refund is not None:
                refund.sent()
        allowed, denied, wait, r, t, never = res
        if isinstance(denied, bytes):
            denied = denied.decode()
        return decision(bool(int(allowed)), denied or None, bool(int(never)), float(wait),
                        rpm_limit, float(r), tpm_limit, float(t))

    async def settle(self, tenant_id: str, tpm_limit: int, reserved: int, actual: int) -> None:
        """Returns once the difference is in Redis: carried by the tenant's next reserve if one
        comes within REFUND_WAIT_S (no call of its own), else sent alone."""
        if tpm_limit <= 0 or reserved == actual:
            return
        key = bucket_key(tenant_id)
        refund = self._refunds.get(key)
        if refund is None:
            refund = self._refunds[key] = _Refund(asyncio.get_running_loop().create_future())
        refund.tpm_limit = tpm_limit
        refund.tokens += reserved - actual
        if self._refund_timer is None:
            self._refund_timer = asyncio.get_running_loop().call_later(
                REFUND_WAIT_S, self._send_refunds)
        await asyncio.shield(refund.done)

    def _send_refunds(self) -> None:
        self._refund_timer = None
        refunds, self._refunds = self._refunds, {}
        for key, refund in refunds.items():
            task = asyncio.ensure_future(self._send_refund(key, refund))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_refund(self, key: str, refund: _Refund) -> None:
        try:
            await self._scripts.call(key, ["settle", 0, refund.tpm_limit, refund.tokens])
        except LimiterUnavailable as exc:
            refund.failed(exc)
        finally:
            refund.sent()


class _Refund:
    """Tokens to give back (or take) for one tenant, and the settles waiting for them."""

    __slots__ = ("done", "tokens", "tpm_limit")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.tokens = 0
        self.tpm_limit = 0

    def failed(self, exc: LimiterUnavailable) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: every waiter may have been cancelled

    def sent(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
