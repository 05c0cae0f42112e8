"""Reserve-then-settle of a tenant's RPM and TPM around one request.

Before forwarding: reserve 1 request and `prompt tokens + max output tokens` in one limiter call
(one Redis round trip). After the response: replace the reservation with the real usage, in a
task of its own so the client never waits for it. Prompt tokens are only counted when the tenant
has a token limit; otherwise they are counted only if the upstream reports no usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from llm_gateway import observability as obs
from llm_gateway.call import Call
from llm_gateway.errors import RateLimited, ServiceUnavailable
from llm_gateway.limits import LimiterFault, LimiterUnavailable, rate_limit_headers
from llm_gateway.limits.base import rate_limit_header_bytes
from llm_gateway.services import Services
from llm_gateway.tokens import reservation

log = logging.getLogger("llm_gateway.limits")
_LOG_EVERY_S = 30.0
_last_logged = 0.0
_pending: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class Reservation:
    """What `reserve` took: `tokens` to settle against the real usage (0: nothing to settle),
    the prompt's tokens when it counted them (0: not counted), and the rate-limit headers for
    the response."""

    tokens: int = 0
    prompt_tokens: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()


NOTHING = Reservation()


async def reserve(svc: Services, call: Call) -> Reservation:
    """Reserve 1 request and the call's tokens, or raise RateLimited (429) or, with the limiter
    down and failing closed, ServiceUnavailable (503)."""
    tenant = call.tenant
    if tenant.rpm_limit <= 0 and tenant.tpm_limit <= 0:
        return NOTHING
    prompt_tokens = tokens = 0
    if tenant.tpm_limit > 0:
        # A large prompt is counted in a thread: the loop serves other tenants meanwhile.
        prompt_tokens = await call.ingress.count_prompt(call.ask, call.encoding)
        tokens = reservation(call.ask.max_output_tokens, prompt_tokens,
                             svc.settings.default_max_tokens, tenant.tpm_limit)
    try:
        decision = await svc.limiter.reserve(
            tenant.tenant_id, tenant.rpm_limit, tenant.tpm_limit, tokens
        )
    except LimiterUnavailable as exc:
        _limiter_down(exc)
        if svc.settings.limiter_fail_open:
            return Reservation(0, prompt_tokens)
        raise ServiceUnavailable(
            "Rate limiting is unavailable, so the request was refused.",
            code="rate_limiter_unavailable",
        ) from None
    if decision.allowed:
        return Reservation(tokens, prompt_tokens, rate_limit_header_bytes(decision))
    headers = rate_limit_headers(decision)
    obs.rate_limited(call, decision.denied_by or "tpm")
    if decision.never_fits:
        raise RateLimited(
            f"This request needs {prompt_tokens} prompt tokens plus its maximum output, "
            f"more than the tenant's limit of {tenant.tpm_limit} tokens per minute: it can "
            "never fit. Lower max_tokens or the prompt size.",
            headers=headers,
            param="max_tokens",
        )
    which = (
        f"requests per minute (limit {tenant.rpm_limit})"
        if decision.denied_by == "rpm"
        else f"tokens per minute (limit {tenant.tpm_limit}, this request reserves "
        f"{tokens})"
    )
    raise RateLimited(
        f"Rate limit reached for {which}. Try again in {decision.retry_after_s:.2f}s.",
        headers=headers,
    )


def settle(svc: Services, call: Call, reserved: Reservation, used: int) -> None:
    """Give back (or take) the difference between reserved and `used` tokens, off the critical
    path."""
    if reserved.tokens <= 0:
        return
    settle_now = getattr(svc.limiter, "settle_now", None)
    if settle_now is not None:  # a limiter that settles in microseconds: no task for it
        try:
            settle_now(call.tenant.tenant_id, call.tenant.tpm_limit, reserved.tokens, used)
        except LimiterUnavailable as exc:
            _limiter_down(exc)
        return
    task = asyncio.ensure_future(_settle(svc, call.tenant.tenant_id, call.tenant.tpm_limit,
                                         reserved.tokens, used))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _settle(svc: Services, tenant_id: str, tpm: int, reserved: int, actual: int) -> None:
    try:
        await svc.limiter.settle(tenant_id, tpm, reserved, actual)
    except LimiterUnavailable as exc:
        _limiter_down(exc)


def _limiter_down(exc: LimiterUnavailable) -> None:
    global _last_logged
    obs.limiter_error()
    now = time.monotonic()
    if now - _last_logged >= _LOG_EVERY_S:
        _last_logged = now
        # A fault will not pass by itself (a bug, a foreign key): say so louder.
        level = logging.ERROR if isinstance(exc, LimiterFault) else logging.WARNING
        log.log(level, "rate limiter unavailable (%s); GATEWAY_LIMITER_FAILURE_MODE applies", exc)
