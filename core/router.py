"""Choosing a route's target and opening the upstream response, with failover.

Targets are tried in order; a failure that another attempt may fix (connection errors, timeouts,
429, 5xx) moves on to the next target, anything else goes straight back to the client. For a
stream, the first chunk is read here, before any byte goes to the client: until then a failover
is still invisible to the client; after it, never.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from llm_gateway.call import Call
from llm_gateway.domain import Target
from llm_gateway.errors import GatewayError, ServiceUnavailable, UpstreamError
from llm_gateway.providers.base import Provider
from llm_gateway.settings import secret_from_env
from llm_gateway.upstream import UpstreamClient


@dataclass(slots=True)
class Opened:
    provider: Provider
    response: aiohttp.ClientResponse
    first_chunk: bytes


def api_key_for(target: Target) -> str | None:
    if target.api_key:
        return target.api_key
    return secret_from_env(target.api_key_env) if target.api_key_env else None


async def open_upstream(
    upstream: UpstreamClient, providers: dict[str, Provider], call: Call
) -> Opened:
    assert call.route is not None
    last: GatewayError | None = None
    for target in call.route.targets:
        provider = providers.get(target.provider)
        if provider is None:
            last = ServiceUnavailable(f"provider {target.provider!r} is not supported")
            continue
        call.target = target
        call.attempts += 1
        try:
            return await _attempt(upstream, provider, target, call)
        except GatewayError as exc:
            if not exc.retryable:
                raise
            last = exc
    assert last is not None
    raise last


async def _attempt(
    upstream: UpstreamClient, provider: Provider, target: Target, call: Call
) -> Opened:
    req = provider.build_request(
        target, call.body, call.raw, stream=call.stream, api_key=api_key_for(target)
    )
    resp = await upstream.send(req)
    try:
        if resp.status >= 400:
            content = await upstream.read_body(resp)
            headers = {k.lower(): v for k, v in resp.headers.items()}
            raise provider.map_error(resp.status, content, headers)
        first = await upstream.read_first(resp) if call.stream else b""
        if call.stream and not first:
            raise UpstreamError("the upstream provider ended the stream before sending anything",
                                code="upstream_disconnected", retryable=True)
    except BaseException:
        resp.close()
        raise
    return Opened(provider, resp, first)
