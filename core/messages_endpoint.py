"""The handlers of Anthropic's endpoints: `POST /v1/messages` (the one request path, with the
Messages ingress bound to the client's `anthropic-version`/`anthropic-beta` headers) and
`POST /v1/messages/count_tokens`.

`count_tokens` is not a generation: it is authenticated and checked against `allowed_models`
like any request, and takes one request of the tenant's RPM (a forwarded count uses the route's
upstream quota), but no TPM and no usage record: neither Anthropic nor LiteLLM bills it. An
Anthropic route forwards it to the upstream's `/v1/messages/count_tokens` (model patched, the
route's credential); any other route answers with the limits' own count.
"""

from __future__ import annotations

import logging

import orjson
from blacksheep import Content, Request, Response
from llm_gateway.auth import authenticate
from llm_gateway.chat_request import parse_json_object, read_body
from llm_gateway.domain import Route, Target, Tenant
from llm_gateway.errors import (
    GatewayError,
    InternalError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    clip,
)
from llm_gateway.limits import LimiterUnavailable, rate_limit_headers
from llm_gateway.messages_request import (
    MESSAGES,
    anthropic_error_response,
    check_messages_body,
    count_messages_prompt,
    wire_headers,
)
from llm_gateway.pipeline import endpoint
from llm_gateway.providers.anthropic import map_anthropic_error
from llm_gateway.providers.anthropic_messages import anthropic_error_fields, messages_headers
from llm_gateway.providers.base import UpstreamRequest, token_count, upstream_json
from llm_gateway.router import api_key_for, ordered_targets
from llm_gateway.services import Services
from llm_gateway.tokens import encoding_name_for

log = logging.getLogger("llm_gateway")
JSON = b"application/json"
_PLAIN = endpoint(MESSAGES)


async def messages(svc: Services, request: Request, rid: str) -> Response:
    """`POST /v1/messages`: the request path, its ingress bound to the client's wire headers."""
    ingress = MESSAGES.with_headers(request)
    handler = _PLAIN if ingress is MESSAGES else endpoint(ingress)
    return await handler(svc, request, rid)


async def count_tokens(svc: Services, request: Request, rid: str) -> Response:
    """`POST /v1/messages/count_tokens`: `{"input_tokens": N}`."""
    try:
        return await _count_tokens(svc, request)
    except GatewayError as exc:
        return anthropic_error_response(exc)
    except Exception:
        log.exception("unhandled error on /v1/messages/count_tokens")
        return anthropic_error_response(InternalError("The gateway had an internal error."))


async def _count_tokens(svc: Services, request: Request) -> Response:
    s = svc.settings
    _, tenant = await authenticate(svc.catalog, request)
    raw = await read_body(request, s.max_body_bytes, s.body_read_timeout_s)
    body = parse_json_object(raw, s.max_json_depth)
    check_messages_body(body, counting=True)
    model: str = body["model"]
    route = await svc.catalog.route(model)
    if route is None:
        raise NotFound(f"The model `{clip(model)}` does not exist or you do not have access "
                       "to it.", code="model_not_found", param="model")
    if not tenant.may_use(model):
        raise PermissionDenied(f"This API key is not allowed to use the model `{model}`.",
                               param="model")
    headers = await _one_request(svc, tenant)
    target = _first_target(svc, route)
    if target is not None and target.provider == "anthropic":
        content = await _forward(svc, target, body, wire_headers(request))
    else:
        n = await count_messages_prompt(body, encoding_name_for(model, s.tokenizer_fallback),
                                        len(raw))
        content = orjson.dumps({"input_tokens": n})
    return Response(200, list(headers), Content(JSON, content))


async def _one_request(svc: Services, tenant: Tenant) -> tuple[tuple[bytes, bytes], ...]:
    """One request of the tenant's RPM (no tokens), or RateLimited."""
    if tenant.rpm_limit <= 0:
        return ()
    try:
        decision = await svc.limiter.reserve(tenant.tenant_id, tenant.rpm_limit, 0, 0)
    except LimiterUnavailable:
        if svc.settings.limiter_fail_open:
            return ()
        raise ServiceUnavailable("Rate limiting is unavailable, so the request was refused.",
                                 code="rate_limiter_unavailable") from None
    headers = rate_limit_headers(decision)
    if not decision.allowed:
        raise RateLimited(f"Rate limit reached for requests per minute (limit "
                          f"{tenant.rpm_limit}). Try again in {decision.retry_after_s:.2f}s.",
                          headers=headers)
    return tuple((k.encode(), v.encode()) for k, v in headers.items())


def _first_target(svc: Services, route: Route) -> Target | None:
    """The target a request would try first: the first whose breaker lets it through."""
    targets = ordered_targets(route)
    for t in targets:
        if svc.breakers.for_target(t.name).available():
            return t
    return targets[0] if targets else None


async def _forward(svc: Services, target: Target, body: dict[str, object],
                   client_headers: tuple[tuple[str, str], ...]) -> bytes:
    """The upstream's own count, checked to be `{"input_tokens": <count>}`."""
    headers = messages_headers(api_key_for(target), client_headers)
    url = f"{target.base_url.rstrip('/')}/v1/messages/count_tokens"
    req = UpstreamRequest(url, headers, orjson.dumps({**body, "model": target.model}))
    resp = await svc.upstream.send(req, stream=False)
    try:
        if resp.status >= 400:
            content = await svc.upstream.read_error_body(resp)
            etype, message = anthropic_error_fields(content)
            raise map_anthropic_error(resp.status, etype, message or f"HTTP {resp.status}",
                                      {k.lower(): v for k, v in resp.headers.items()})
        content = await svc.upstream.read_body(resp)
    finally:
        resp.release()
    n = token_count(upstream_json(content).get("input_tokens"))
    if n is None:
        raise UpstreamError("the upstream provider returned an invalid token count")
    return orjson.dumps({"input_tokens": n})

