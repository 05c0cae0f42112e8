"""Responses kept by an upstream: who owns each id the gateway relayed, and the endpoints that
reach them (`GET`/`DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`).

An `openai` target stores the responses it serves (unless the request said `store: false`),
under the gateway's provider key, which every tenant shares. So the gateway remembers, for each
response id it relays from such a target, the tenant it served and the route and target that
served it (`ResponseOwner`, 30 days, the upstream's own retention), and proxies these endpoints
to that target only for that tenant. Any other id (another tenant's, an unknown one, one the
gateway translated for an `anthropic` or `self-hosted` target, whose ids are the gateway's own
and of which nothing is stored) is a 404, the same for all: nothing tells a tenant whether an id
exists elsewhere. `previous_response_id` is checked the same way before a request goes out.
"""

from __future__ import annotations

import re

from blacksheep import Content, Request, Response
from llm_gateway.auth import authenticate
from llm_gateway.domain import Route, Tenant
from llm_gateway.errors import InvalidRequest, NotFound, clip
from llm_gateway.http import route_value
from llm_gateway.providers import OPENAI_RESPONSES, PROVIDERS
from llm_gateway.providers.base import UpstreamRequest
from llm_gateway.providers.openai import map_openai_error
from llm_gateway.response_owners import owner_of
from llm_gateway.router import api_key_for
from llm_gateway.services import Services

JSON = b"application/json"


def keeps_responses(route: Route) -> bool:
    """Whether a target of `route` is reached on its own Responses API (which stores them)."""
    return any(OPENAI_RESPONSES in PROVIDERS[t.provider].wires for t in route.targets
               if t.provider in PROVIDERS)


async def check_previous(svc: Services, tenant: Tenant, route: Route,
                         previous_id: object) -> None:
    """`previous_response_id` must name a response this tenant got from this gateway. (A route
    without a target that keeps responses refuses it in its translator: send the whole input.)"""
    if previous_id is None or not keeps_responses(route):
        return
    if not isinstance(previous_id, str) or await owner_of(svc, tenant, previous_id) is None:
        shown = clip(previous_id) if isinstance(previous_id, str) else "?"
        raise InvalidRequest(f"Previous response with id '{shown}' not found.",
                             param="previous_response_id", code="previous_response_not_found")


def _not_found(response_id: str) -> NotFound:
    return NotFound(
        f"No response found with id '{clip(response_id)}'. The gateway keeps responses only for "
        "routes whose provider stores them (openai); responses translated for other providers "
        "(anthropic, self-hosted) are not stored, whatever `store` said.",
        code="response_not_found")


async def get_response(svc: Services, request: Request, rid: str) -> Response:
    return await _proxy(svc, request, "GET", "")


async def delete_response(svc: Services, request: Request, rid: str) -> Response:
    return await _proxy(svc, request, "DELETE", "")


async def cancel_response(svc: Services, request: Request, rid: str) -> Response:
    return await _proxy(svc, request, "POST", "/cancel")


async def _proxy(svc: Services, request: Request, method: str, suffix: str) -> Response:
    """The request, sent to the target that served the response, for its owner only."""
    _, tenant = await authenticate(svc.catalog, request)
    response_id = route_value(request, "response_id")
    owner = await owner_of(svc, tenant, response_id)
    route = await svc.catalog.route(owner.route) if owner else None
    target = next((t for t in route.targets if t.name == owner.target), None) if (
        route and owner and tenant.may_use(route.name)) else None
    if owner is None or target is None:
        raise _not_found(response_id)
    query = request.url.query or b""
    if method == "GET" and re.search(rb"(^|&)stream=(true|1)", query):
        raise InvalidRequest("Streaming a stored response again is not supported by the "
                             "gateway: fetch it without `stream`.", param="stream")
    url = f"{target.base_url.rstrip('/')}/responses/{response_id}{suffix}"
    if query:
        url += "?" + query.decode("ascii", "replace")
    headers = {"accept-encoding": "identity"}
    if method == "POST":
        headers["content-type"] = "application/json"
    key = api_key_for(target)
    if key:
        headers["authorization"] = f"Bearer {key}"
    resp = await svc.upstream.send(UpstreamRequest(url, headers, b"{}" if method == "POST"
                                                   else b""), stream=False, method=method)
    try:
        if resp.status >= 400:
            content = await svc.upstream.read_error_body(resp)
            raise map_openai_error(resp.status, content,
                                   {k.lower(): v for k, v in resp.headers.items()})
        content = await svc.upstream.read_body(resp)
    finally:
        resp.release()
    if method == "DELETE":
        await svc.store.delete_response_owner(response_id)
    return Response(200, None, Content(JSON, content))
