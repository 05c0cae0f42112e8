"""What a Redis error reply means to the limiter, read from its prefix (its first word).

Every error reply becomes LimiterUnavailable, so `GATEWAY_LIMITER_FAILURE_MODE` decides what the
request gets, exactly as for a lost connection: either way the limiter has no answer for it.
The prefixes in UNAVAILABLE are Redis refusing for a while (memory, a long script, a replica, a
failover, a load, credentials). Any other prefix (`ERR` from an error inside our script,
`WRONGTYPE` from a foreign key under our name) is a LimiterFault: the same policy, but logged as
an error, since waiting will not fix it. `ERR` cannot be told apart further without reading free
text, which we never do.
"""

from __future__ import annotations

from llm_gateway.limits.base import LimiterFault, LimiterUnavailable

UNAVAILABLE = frozenset({
    "OOM",  # maxmemory reached under noeviction: writes refused
    "BUSY",  # another script has run past busy-reply-threshold
    "READONLY",  # a replica, e.g. the old primary after a failover
    "MASTERDOWN",  # a replica that lost its primary, with replica-serve-stale-data no
    "LOADING",  # loading its dataset after a restart
    "MISCONF",  # a failed RDB save with stop-writes-on-bgsave-error
    "NOREPLICAS",  # min-replicas-to-write not met
    "TRYAGAIN",  # Cluster: a slot being migrated
    "CLUSTERDOWN",  # Cluster: slots not served
    "NOAUTH",  # credentials: wrong, missing or without the right
    "WRONGPASS",
    "NOPERM",
})

# At most this much of Redis' text goes into logs: it names the script, never a tenant.
_TEXT_CHARS = 200


def prefix(reply: str) -> str:
    """The error code: the first word of an error reply (`OOM command not allowed...`)."""
    return reply.split(" ", 1)[0]


def translate(reply: str) -> LimiterUnavailable:
    """The exception for an error reply's text, prefix included."""
    text = f"redis answered {reply[:_TEXT_CHARS]}"
    return LimiterUnavailable(text) if prefix(reply) in UNAVAILABLE else LimiterFault(text)
