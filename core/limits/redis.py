"""The Redis limiter: exact across every worker of every replica, one round trip per request.

One Lua script checks and reserves both buckets atomically, with Redis server time (replicas'
clocks never matter). Both buckets of a tenant live in one hash whose key carries the tenant as
a hash tag, so the same script runs on Redis Cluster. A bucket idle for 60 s is full again, so
the key expires after 61 s of idleness without changing any answer. Levels are returned as
strings: Redis truncates Lua floats to integers.
"""

from __future__ import annotations

from typing import Any

import coredis
import coredis.exceptions
from llm_gateway.limits.base import Decision, LimiterUnavailable, decision

# KEYS[1]: the tenant's bucket hash. ARGV: rpm_limit, tpm_limit, tokens, mode.
# mode "reserve": tokens = reservation; returns {allowed, denied_by, retry_after, r, t, never}.
# mode "settle": tokens = reserved - actual, added back to the token bucket (capped).
LUA = """
local key = KEYS[1]
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local v = redis.call('HMGET', key, 'r', 'rt', 't', 'tt')
local r, rt, t, tt = tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])
if r == nil then r = rpm; rt = now end
if t == nil then t = tpm; tt = now end
if rpm > 0 then r = math.min(rpm, r + math.max(0, now - rt) * rpm / 60) end
if tpm > 0 then t = math.min(tpm, t + math.max(0, now - tt) * tpm / 60) end
if ARGV[4] == 'settle' then
  t = math.min(tpm, t + cost)
  redis.call('HSET', key, 't', tostring(t), 'tt', tostring(now))
  redis.call('PEXPIRE', key, 61000)
  return 1
end
local allowed, denied, wait, never = 0, '', 0, 0
if tpm > 0 and cost > tpm then
  denied = 'tpm'
  never = 1
else
  local need_r, need_t = 0, 0
  if rpm > 0 and r < 1 then need_r = (1 - r) * 60 / rpm end
  if tpm > 0 and t < cost then need_t = (cost - t) * 60 / tpm end
  if need_r <= 0 and need_t <= 0 then
    allowed = 1
    if rpm > 0 then r = r - 1 end
    if tpm > 0 then t = t - cost end
  elseif need_r >= need_t then
    denied = 'rpm'
    wait = need_r
  else
    denied = 'tpm'
    wait = need_t
  end
end
redis.call('HSET', key, 'r', tostring(r), 'rt', tostring(now), 't', tostring(t), 'tt',
           tostring(now))
redis.call('PEXPIRE', key, 61000)
return {allowed, denied, tostring(wait), tostring(r), tostring(t), never}
"""

_ERRORS = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.BusyLoadingError,
    TimeoutError,
    OSError,
)


def bucket_key(tenant_id: str) -> str:
    return f"llmgw:{{{tenant_id}}}:buckets"


class RedisLimiter:
    def __init__(self, addr: str, *, cluster: bool = False, timeout_s: float = 0.25) -> None:
        host, port = _host_port(addr)
        kwargs: dict[str, Any] = {"connect_timeout": timeout_s, "stream_timeout": timeout_s,
                                  "decode_responses": True,
                                  "retry_policy": coredis.retry.NoRetryPolicy()}
        if cluster:
            self._client: Any = coredis.RedisCluster(host=host, port=port, **kwargs)
        else:
            self._client = coredis.Redis(host=host, port=port, **kwargs)
        self._script = self._client.register_script(LUA)
        self._entered = False

    async def start(self) -> None:
        await self._client.__aenter__()
        self._entered = True

    async def aclose(self) -> None:
        if self._entered:
            self._entered = False
            await self._client.__aexit__(None, None, None)

    async def reserve(self, tenant_id: str, rpm_limit: int, tpm_limit: int,
                      tokens: int) -> Decision:
        try:
            res = await self._script(keys=[bucket_key(tenant_id)],
                                     args=[rpm_limit, tpm_limit, tokens, "reserve"])
        except _ERRORS as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}") from None
        allowed, denied, wait, r, t, never = res
        return decision(bool(int(allowed)), denied or None, bool(int(never)), float(wait),
                        rpm_limit, float(r), tpm_limit, float(t))

    async def settle(self, tenant_id: str, tpm_limit: int, reserved: int, actual: int) -> None:
        if tpm_limit <= 0 or reserved == actual:
            return
        try:
            await self._script(keys=[bucket_key(tenant_id)],
                               args=[0, tpm_limit, reserved - actual, "settle"])
        except _ERRORS as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}") from None


def _host_port(addr: str) -> tuple[str, int]:
    rest = addr.split("://", 1)[-1].split("/", 1)[0]
    rest = rest.rsplit("@", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, 6379
    return host.strip("[]"), int(port)
