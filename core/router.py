"""Choosing a route's target and opening the upstream response: retries, failover, breakers.

Targets are tried in order (consecutive targets with a `weight` share load: their order is drawn
by weight for each request). On a target, a failure another attempt may fix (connection error,
timeout, 429, 5xx) is retried with exponential backoff and jitter, honouring a short
`Retry-After`; then the next target is tried. A 4xx other than 429 goes straight back to the
client. Attempts and time are bounded in total. A target whose breaker is open is skipped.

For a stream, the first chunk is read here, before any byte goes to the client: until then a
failover is still invisible to the client; after it, never.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import pybreaker
from llm_gateway import observability as obs
from llm_gateway.breakers import TargetBreaker
from llm_gateway.call import Call, Tries
from llm_gateway.domain import Route, Target
from llm_gateway.errors import (
    GatewayError,
    InvalidRequest,
    ServiceUnavailable,
    UpstreamError,
    UpstreamRedirect,
)
from llm_gateway.providers.base import Provider
from llm_gateway.services import Services
from llm_gateway.settings import Settings, secret_from_env
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)


@dataclass(frozen=True, slots=True)
class Opened:
    """An upstream response that answered with success: for a stream, its first chunk is read."""

    translator: Provider  # the translator from the client's wire format to the target's
    response: aiohttp.ClientResponse
    first_chunk: bytes
    target: Target
    attempts: int  # including this one


def api_key_for(target: Target) -> str | None:
    if target.api_key:
        return target.api_key
    return secret_from_env(target.api_key_env) if target.api_key_env else None


def ordered_targets(route: Route) -> Sequence[Target]:
    targets = route.targets
    if not any(t.weight for t in targets):
        return targets
    out: list[Target] = []
    group: list[Target] = []
    for t in (*targets, None):
        if t is not None and t.weight:
            group.append(t)
            continue
        while group:  # a weighted draw without replacement
            pick = random.choices(range(len(group)), weights=[g.weight or 1 for g in group])[0]
            out.append(group.pop(pick))
        if t is not None:
            out.append(t)
    return out


async def open_upstream(svc: Services, call: Call, tries: Tries) -> Opened:
    """The first target that answers with success, or the error of the last attempt. `tries`
    counts the attempts as they are made (the record reports them also when all failed)."""
    s = svc.settings
    deadline = time.monotonic() + s.max_retry_time_s
    last: GatewayError | None = None
    wire = call.ingress.wire
    for target in ordered_targets(call.route):
        if tries.count >= s.max_attempts or time.monotonic() >= deadline:
            break
        provider = svc.translators.get((wire, target.provider))
        if provider is None:
            last = last or _unserved(call, target)
            continue
        breaker = svc.breakers.for_target(target.name)
        if not breaker.available():
            obs.attempt_skipped(call, target, "circuit_open")
            last = _circuit_open(target)
            continue
        try:
            return await _on_target(svc, call, tries, provider, target, breaker, deadline)
        except pybreaker.CircuitBreakerError:
            obs.attempt_skipped(call, target, "circuit_open")
            last = _circuit_open(target)
        except GatewayError as exc:
            if not exc.retryable:
                raise
            last = exc
    raise last or ServiceUnavailable("No upstream target could be tried.",
                                     code="no_upstream_available")


def _unserved(call: Call, target: Target) -> InvalidRequest:
    return InvalidRequest(
        f"The model `{call.route.name}` cannot serve the {call.ingress.endpoint} endpoint: its "
        f"`{target.provider}` target does not speak that API.", code="unsupported_endpoint",
        param="model")


def _circuit_open(target: Target) -> ServiceUnavailable:
    return ServiceUnavailable("The upstream provider is failing; its circuit breaker is open.",
                              code="upstream_circuit_open")


async def _on_target(svc: Services, call: Call, tries: Tries, provider: Provider,
                     target: Target, breaker: TargetBreaker, deadline: float) -> Opened:
    """The attempts of one request on one target, under the target's breaker as one call: a
    request that fails there, however many retries it made, counts one failure (N slow requests
    from one tenant add N, not N x attempts, to the breaker every tenant shares)."""
    with breaker.attempt():
        return await _with_retries(svc, call, tries, provider, target, deadline)


async def _with_retries(svc: Services, call: Call, tries: Tries, provider: Provider,
                        target: Target, deadline: float) -> Opened:
    s = svc.settings
    try:
        return await _traced(svc, call, tries, provider, target)
    except GatewayError as exc:
        if s.retries_per_target == 0 or not _may_retry(exc, s, tries, deadline):
            raise
        first_failure = exc
    # Only a failure pays for the retry machinery: the happy path is one plain attempt. The
    # failure is replayed as tenacity's first attempt, so its own wait rule covers every retry.
    replay: list[GatewayError] = [first_failure]
    retrying = AsyncRetrying(
        stop=stop_after_attempt(1 + s.retries_per_target),
        wait=retry_wait(s.retry_backoff_s),
        retry=retry_if_exception(lambda e: _may_retry(e, s, tries, deadline)),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            if replay:
                raise replay.pop()
            return await _traced(svc, call, tries, provider, target)
    raise AssertionError("unreachable: tenacity re-raises the last error")


async def _traced(svc: Services, call: Call, tries: Tries, provider: Provider,
                  target: Target) -> Opened:
    """One attempt, in its own span."""
    tries.target = target
    tries.count += 1
    with obs.attempt_span(call, target, tries.count) as span:
        resp, first = await _attempt(svc, provider, target, call)
        span.outcome = "success"
        return Opened(provider, resp, first, target, tries.count)


def _may_retry(exc: BaseException, s: Settings, tries: Tries, deadline: float) -> bool:
    """Whether to try the same target again (failover to the next one is decided apart)."""
    if not isinstance(exc, GatewayError) or not exc.retryable:
        return False
    if isinstance(exc, UpstreamRedirect):
        return False  # the target answers the same way every time; the next target may not
    if tries.count >= s.max_attempts or time.monotonic() >= deadline:
        return False
    wait = retry_after_s(exc)
    return wait is None or wait <= s.retry_after_max_s


def retry_after_s(exc: BaseException | None) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: treat as "long", i.e. not worth waiting for here


class retry_wait(wait_exponential_jitter):
    """tenacity's exponential backoff with jitter, unless the failure carries a short
    `Retry-After` (a longer one stopped the retries in `_may_retry`): then exactly that."""

    def __init__(self, backoff_s: float) -> None:
        super().__init__(multiplier=backoff_s, max=2.0, jitter=backoff_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and outcome.failed:
            after = retry_after_s(outcome.exception())
            if after is not None:
                return after
        return super().__call__(retry_state)


async def _attempt(svc: Services, provider: Provider, target: Target,
                   call: Call) -> tuple[aiohttp.ClientResponse, bytes]:
    ask = call.ask
    req = provider.build_request(target, ask.body, ask.raw, stream=ask.stream,
                                 api_key=api_key_for(target), headers=ask.headers)
    obs.inject_trace_headers(call, req.headers)
    resp = await svc.upstream.send(req, stream=ask.stream)
    try:
        if resp.status >= 400:
            content = await svc.upstream.read_error_body(resp)
            headers = {k.lower(): v for k, v in resp.headers.items()}
            raise provider.map_error(resp.status, content, headers)
        first = await svc.upstream.read_first(resp) if ask.stream else b""
        if ask.stream and not first:
            raise UpstreamError("the upstream provider ended the stream before sending anything",
                                code="upstream_disconnected", retryable=True)
    except BaseException:
        resp.close()
        raise
    return resp, first
