"""The BlackSheep application: the HTTP route table, per-worker start and stop, and the one place
where errors become HTTP responses."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

from blacksheep import Application, Content, Request, Response
from blacksheep.exceptions import HTTPException
from llm_gateway import admin, finish, stored_responses
from llm_gateway import observability as obs
from llm_gateway.auth import authenticate
from llm_gateway.breakers import Breakers
from llm_gateway.catalog import Catalog
from llm_gateway.chat_request import CHAT
from llm_gateway.domain import Route, target_label
from llm_gateway.embeddings_request import EMBEDDINGS
from llm_gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    clip,
)
from llm_gateway.http import route_value
from llm_gateway.limits import Limiter, LimiterUnavailable
from llm_gateway.messages_endpoint import count_tokens, messages
from llm_gateway.messages_request import anthropic_error_response
from llm_gateway.pipeline import Handler, client_request_id, endpoint, new_request_id
from llm_gateway.providers import build_translators
from llm_gateway.responses_request import RESPONSES
from llm_gateway.services import Services
from llm_gateway.settings import Settings
from llm_gateway.store.base import Store
from llm_gateway.upstream import UpstreamClient
from llm_gateway.usage import UsageSink

log = logging.getLogger("llm_gateway")

JSON = b"application/json"


def error_response(exc: GatewayError) -> Response:
    headers = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    return Response(exc.status, headers, Content(JSON, exc.body()))


def _json(data: bytes, status: int = 200) -> Response:
    return Response(status, None, Content(JSON, data))


async def healthz(svc: Services, request: Request, rid: str) -> Response:
    return _json(b'{"status":"ok"}')


async def readyz(svc: Services, request: Request, rid: str) -> Response:
    try:
        await svc.store.ping()
    except Exception as exc:
        log.warning("readiness check failed: %s", type(exc).__name__)
        raise ServiceUnavailable("the store is not reachable", code="store_unavailable") from None
    limiter = await _limiter_state(svc)
    breakers = {target_label(n): state for n, state in svc.breakers.states().items()}
    return admin.json_response({"status": "ready", "limiter": limiter,
                                "circuit_breakers": breakers})


async def _limiter_state(svc: Services) -> str:
    """`ok` or `degraded` (failing open): requests are served either way. Failing closed,
    requests would all get 503, so the worker is not ready."""
    try:
        await svc.limiter.ping()
    except LimiterUnavailable as exc:
        log.warning("readiness: rate limiter unavailable: %s", exc)
        if not svc.settings.limiter_fail_open:
            raise ServiceUnavailable("the rate limiter is not reachable",
                                     code="rate_limiter_unavailable") from None
        return "degraded"
    return "ok"


async def metrics(svc: Services, request: Request, rid: str) -> Response:
    """Prometheus exposition, the same whichever worker answers (multiprocess mode)."""
    if not obs.metrics_enabled():
        raise NotFound("Metrics are turned off (GATEWAY_METRICS=false).", code="unknown_url")
    content_type, body = await obs.render_metrics(svc.usage.depth())
    return Response(200, None, Content(content_type, body))


async def list_models(svc: Services, request: Request, rid: str) -> Response:
    _, tenant = await authenticate(svc.catalog, request)
    routes = [r for r in await svc.catalog.routes() if tenant.may_use(r.name)]
    return admin.json_response({
        "object": "list",
        "data": [_model_object(r) for r in routes],
    })


async def get_model(svc: Services, request: Request, rid: str) -> Response:
    _, tenant = await authenticate(svc.catalog, request)
    name = route_value(request, "model")
    route = await svc.catalog.route(name)
    if route is None or not tenant.may_use(name):
        raise NotFound(f"The model `{clip(name)}` does not exist or you do not have access to it.",
                       code="model_not_found", param="model")
    return admin.json_response(_model_object(route))


def _model_object(r: Route) -> dict[str, object]:
    return {"id": r.name, "object": "model", "created": int(r.updated_at),
            "owned_by": r.targets[0].provider}


def _admin(fn: Callable[[Services, Request], Awaitable[Response]]) -> Handler:
    async def handler(svc: Services, request: Request, rid: str) -> Response:
        return await fn(svc, request)

    return handler


# (method, path, handler): the whole HTTP surface in one place. A model endpoint is
# `endpoint(its ingress)`: the one request path, parsing and answering in the client's format.
ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v1/chat/completions", endpoint(CHAT)),
    ("POST", "/v1/messages", messages),  # endpoint(MESSAGES), bound to anthropic-* headers
    ("POST", "/v1/messages/count_tokens", count_tokens),
    ("POST", "/v1/embeddings", endpoint(EMBEDDINGS)),
    ("POST", "/v1/responses", endpoint(RESPONSES)),
    ("GET", "/v1/responses/:response_id", stored_responses.get_response),
    ("DELETE", "/v1/responses/:response_id", stored_responses.delete_response),
    ("POST", "/v1/responses/:response_id/cancel", stored_responses.cancel_response),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/:model", get_model),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("POST", "/admin/tenants", _admin(admin.create_tenant)),
    ("GET", "/admin/tenants", _admin(admin.list_tenants)),
    ("GET", "/admin/tenants/:tenant_id", _admin(admin.get_tenant)),
    ("PATCH", "/admin/tenants/:tenant_id", _admin(admin.patch_tenant)),
    ("DELETE", "/admin/tenants/:tenant_id", _admin(admin.delete_tenant)),
    ("POST", "/admin/tenants/:tenant_id/keys", _admin(admin.create_key)),
    ("DELETE", "/admin/tenants/:tenant_id/keys/:key_id", _admin(admin.delete_key)),
    ("GET", "/admin/tenants/:tenant_id/usage", _admin(admin.tenant_usage)),
    ("PUT", "/admin/models/:name", _admin(admin.put_model)),
    ("GET", "/admin/models", _admin(admin.list_models)),
    ("DELETE", "/admin/models/:name", _admin(admin.delete_model)),
]


class Gateway:
    """Holds a worker's services between start and stop and adapts handlers to BlackSheep."""

    def __init__(
        self,
        settings: Settings,
        make_store: Callable[[Settings], Store],
        make_limiter: Callable[[Settings], Limiter],
        make_sink: Callable[[Settings], UsageSink],
    ) -> None:
        self.settings = settings
        self._make_store = make_store
        self._make_limiter = make_limiter
        self._make_sink = make_sink
        self.services: Services | None = None

    async def start(self, app: Application) -> None:
        s = self.settings
        obs.configure(s)
        store = self._make_store(s)
        await store.start()
        upstream = UpstreamClient(s)
        await upstream.start()
        limiter = self._make_limiter(s)
        await limiter.start()
        self.services = Services(
            settings=s,
            store=store,
            catalog=Catalog(store),
            limiter=limiter,
            upstream=upstream,
            translators=build_translators(s),
            usage=self._make_sink(s),
            breakers=Breakers(s.breaker_fail_max, s.breaker_reset_s),
        )
        log.info("worker started", extra={"fields": {"pid": os.getpid()}})

    async def stop(self, app: Application) -> None:
        svc = self.services
        try:
            if svc is not None:
                # Requests whose usage is still being counted: their records go out first.
                await finish.drain(svc.settings.shutdown_grace_s)
                svc.usage.flush()
                await svc.upstream.aclose()
                await svc.limiter.aclose()
                await svc.store.aclose()
        finally:
            obs.shutdown()
            log.info("worker stopped", extra={"fields": {"pid": os.getpid()}})

    def wrap(self, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            rid = new_request_id()
            try:
                assert self.services is not None, "worker not started"
                response = await fn(self.services, request, rid)
            except GatewayError as exc:
                response = error_response(exc)
            except Exception:
                log.exception("unhandled error on %s", request.url.path.decode())
                response = error_response(InternalError("The gateway had an internal error."))
            response.add_header(b"x-request-id", (client_request_id(request) or rid).encode())
            return response

        return handler


def build_app(gateway: Gateway) -> Application:
    app = Application()
    paths: dict[str, set[str]] = {}
    for method, path, fn in ROUTES:
        app.router.add(method, path, gateway.wrap(fn))
        paths.setdefault(path, set()).add(method)

    async def fallback(request: Request) -> Response:
        path = request.url.path.decode()
        if any(_same_shape(path, p) for p in paths):
            exc: GatewayError = MethodNotAllowed(
                f"Method {request.method} is not allowed on {clip(path)}."
            )
        else:
            exc = NotFound(f"Unknown path {clip(path)}.", code="unknown_url")
        # Anthropic's SDKs read errors on their paths in Anthropic's shape.
        anthropic = path == "/v1/messages" or path.startswith("/v1/messages/")
        response = anthropic_error_response(exc) if anthropic else error_response(exc)
        response.add_header(b"x-request-id", new_request_id().encode())
        return response

    app.router.fallback = fallback

    async def http_error(app_: Application, request: Request, exc: HTTPException) -> Response:
        if exc.status == 400:
            return error_response(InvalidRequest("The request could not be parsed."))
        if exc.status == 404:
            return error_response(NotFound("Not found.", code="unknown_url"))
        return error_response(InternalError("The gateway had an internal error."))

    async def server_error(app_: Application, request: Request, exc: Exception) -> Response:
        return error_response(InternalError("The gateway had an internal error."))

    for status in (400, 404, 500):
        app.exceptions_handlers[status] = http_error  # type: ignore[assignment]
    app.exceptions_handlers[Exception] = server_error  # type: ignore[index]
    app.on_start += gateway.start
    app.on_stop += gateway.stop
    return app


def _same_shape(path: str, pattern: str) -> bool:
    a, b = path.rstrip("/").split("/"), pattern.split("/")
    return len(a) == len(b) and all(p.startswith(":") or p == q for p, q in zip(b, a, strict=True))
