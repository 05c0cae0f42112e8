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

from llm_gateway import observability as obs
from llm_gateway.call import Call
from llm_gateway.errors import RateLimited, ServiceUnavailable
from llm_gateway.limits import LimiterFault, LimiterUnavailable, rate_limit_headers
from llm_gateway.services import Services
from llm_gateway.tokens import count_prompt, encoding_name_for, reservation

log = logging.getLogger("llm_gateway.limits")
_LOG_EVERY_S = 30.0
_last_logged = 0.0
_pending: set[asyncio.Task[None]] = set()


async def reserve(svc: Services, call: Call) -> None:
    tenant = call.tenant
    call.encoding = encoding_name_for(call.model, svc.settings.tokenizer_fallback)
    limiter = svc.limiter
    if limiter is None or (tenant.rpm_limit <= 0 and tenant.tpm_limit <= 0):
        return
    if tenant.tpm_limit > 0:
        # A large prompt is counted in a thread: the loop serves other tenants meanwhile.
        call.prompt_tokens = await count_prompt(call.body, call.encoding, len(call.raw))
        call.reserved_tokens = reservation(
            call.body, call.prompt_tokens, svc.settings.default_max_tokens, tenant.tpm_limit
        )
    try:
        decision = await limiter.reserve(
            tenant.tenant_id, tenant.rpm_limit, tenant.tpm_limit, call.reserved_tokens
        )
    except LimiterUnavailable as exc:
        call.reserved_tokens = 0
        _limiter_down(exc)
        if svc.settings.limiter_fail_open:
            return
        raise ServiceUnavailable(
            "Rate limiting is unavailable, so the request was refused.",
            code="rate_limiter_unavailable",
        ) from None
    headers = rate_limit_headers(decision)
    call.response_headers.extend((k.encode(), v.encode()) for k, v in headers.items())
    if decision.allowed:
        return
    reserved, call.reserved_tokens = call.reserved_tokens, 0
    obs.rate_limited(call, decision.denied_by or "tpm")
    if decision.never_fits:
        raise RateLimited(
            f"This request needs {call.prompt_tokens} prompt tokens plus its maximum output, "
            f"more than the tenant's limit of {tenant.tpm_limit} tokens per minute: it can "
            "never fit. Lower max_tokens or the prompt size.",
            headers=headers,
            param="max_tokens",
        )
    which = (
        f"requests per minute (limit {tenant.rpm_limit})"
        if decision.denied_by == "rpm"
        else f"tokens per minute (limit {tenant.tpm_limit}, this request reserves "
        f"{reserved})"
    )
    raise RateLimited(
        f"Rate limit reached for {which}. Try again in {decision.retry_after_s:.2f}s.",
        headers=headers,
    )


def settle(svc: Services, call: Call) -> None:
    """Give back (or take) the difference between reserved and used tokens, off the critical
    path."""
    if svc.limiter is None or call.reserved_tokens <= 0:
        return
    actual = call.usage.input_tokens + call.usage.output_tokens
    task = asyncio.ensure_future(_settle(svc, call.tenant.tenant_id, call.tenant.tpm_limit,
                                         call.reserved_tokens, actual))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _settle(svc: Services, tenant_id: str, tpm: int, reserved: int, actual: int) -> None:
    assert svc.limiter is not None
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
