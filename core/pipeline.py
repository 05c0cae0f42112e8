"""The request path of `POST /v1/chat/completions`, top to bottom.

    authenticate -> read and check the body -> look up the route -> check the model is allowed
    -> reserve RPM/TPM -> open the upstream (failover inside) -> relay the response
    -> settle the limits with real usage -> emit one usage record (`finish`)

Everything provider-specific sits behind the adapter chosen in `router`; everything that can
go wrong is a GatewayError, turned into OpenAI's error JSON in one place (`app`). Once a request
has reached the limiter, `finish` ends it exactly once, whatever happened: on an error here, after
a complete reply, or from the relay when a stream is over.
"""

from __future__ import annotations

import asyncio
import time
from random import getrandbits

from blacksheep import Content, Request, Response
from blacksheep.exceptions import MessageAborted
from llm_gateway import limiting
from llm_gateway import observability as obs
from llm_gateway.auth import authenticate
from llm_gateway.call import Call
from llm_gateway.chat_request import parse_chat, read_body
from llm_gateway.disconnect import DisconnectWatcher
from llm_gateway.domain import Tenant
from llm_gateway.errors import GatewayError, InternalError, NotFound, PermissionDenied
from llm_gateway.finish import finish
from llm_gateway.router import open_upstream
from llm_gateway.services import Services
from llm_gateway.streaming import relay_stream

JSON = b"application/json"
CLIENT_CLOSED = 499


async def chat_completions(
    svc: Services, request: Request, request_id: str, client_id: str | None
) -> Response:
    t0 = time.perf_counter()
    trace = obs.start_request(request, request_id)
    tenant: Tenant | None = None
    model = ""
    try:
        with trace.child("auth"):
            key, tenant = await authenticate(svc.catalog, request)
        try:
            raw = await read_body(request, svc.settings.max_body_bytes,
                                  svc.settings.body_read_timeout_s)
        except MessageAborted:
            trace.end(CLIENT_CLOSED)
            return Response(CLIENT_CLOSED)
        body = parse_chat(raw, svc.settings.max_json_depth)
        model = body["model"]
        route = await svc.catalog.route(model)
        if route is None:
            raise NotFound(f"The model `{model}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model")
        if not tenant.may_use(model):
            raise PermissionDenied(f"This API key is not allowed to use the model `{model}`.",
                                   param="model")
    except GatewayError as exc:
        obs.request_rejected(trace, tenant, model, exc)
        raise
    except Exception:
        obs.request_rejected(trace, tenant, model, InternalError("internal error"))
        raise
    call = Call(request_id=request_id, client_request_id=client_id, tenant=tenant,
                key_id=key.key_id, model=model, body=body, raw=raw,
                stream=body.get("stream") is True, route=route, trace=trace, t0=t0)
    try:
        with trace.child("limiter"):
            await limiting.reserve(svc, call)
        if call.stream:
            return await _stream(svc, call, request)
        return await _complete(svc, call, request)
    except BaseException as exc:
        _failed(call, exc)
        finish(svc, call)
        raise


def _failed(call: Call, exc: BaseException) -> None:
    if isinstance(exc, GatewayError):
        call.status, call.error = exc.status, exc
        exc.headers.update((k.decode(), v.decode()) for k, v in call.response_headers)
    elif isinstance(exc, asyncio.CancelledError):
        call.status = CLIENT_CLOSED  # the worker is stopping, or the client left
    else:  # a bug, or an input nobody foresaw: `app` answers 500; the ledger says so too
        call.status, call.error = 500, InternalError("The gateway had an internal error.")


async def _complete(svc: Services, call: Call, request: Request) -> Response:
    task = asyncio.current_task()
    watcher = DisconnectWatcher(request, task.cancel if task else _noop)
    try:
        opened = await open_upstream(svc, call)
        try:
            content = await svc.upstream.read_body(opened.response)
        finally:
            opened.response.release()
        call.mark_first_byte()
        out, call.usage = opened.provider.parse_response(content, call.model)
    except asyncio.CancelledError:
        return _client_left(svc, call, watcher, task)
    finally:
        watcher.stop()
    call.status = 200
    # Settling, the usage record, metrics and the span end wait for the next loop iteration:
    # the response goes out first.
    asyncio.get_running_loop().call_soon(finish, svc, call)
    return Response(200, call.response_headers, Content(JSON, out))


async def _stream(svc: Services, call: Call, request: Request) -> Response:
    task = asyncio.current_task()
    # Until the stream starts, a client that leaves cancels the attempts (and their retries).
    watcher = DisconnectWatcher(request, task.cancel if task else _noop)
    try:
        opened = await open_upstream(svc, call)
    except asyncio.CancelledError:
        watcher.stop()
        return _client_left(svc, call, watcher, task)
    except BaseException:
        watcher.stop()
        raise
    translator = opened.provider.stream_translator(
        call.model, call.client_wants_usage, call.encoding
    )
    return relay_stream(svc, call, watcher, opened, translator)


def _client_left(svc: Services, call: Call, watcher: DisconnectWatcher,
                 task: asyncio.Task[object] | None) -> Response:
    if not watcher.disconnected:
        raise asyncio.CancelledError
    if task is not None:
        task.uncancel()
    call.status = CLIENT_CLOSED
    finish(svc, call)
    return Response(CLIENT_CLOSED)


def _noop() -> None:
    return None


def client_request_id(request: Request) -> str | None:
    """The client's X-Request-ID, when it sent a sane one: echoed back and logged. The ledger
    keys records by the gateway's own id, since clients may reuse theirs."""
    given = request.get_first_header(b"x-request-id")
    if given and len(given) <= 128 and given.isascii():
        text = given.decode()
        if text.isprintable():
            return text
    return None


def new_request_id() -> str:
    # 96 random bits from the per-process generator (reseeded from os.urandom in every forked
    # worker): as unique as token_hex(12), without a system call per request.
    return f"req_{getrandbits(96):024x}"
