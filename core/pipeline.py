"""The request path of every model endpoint, top to bottom.

    admit: authenticate -> read the body, parsed by the endpoint's ingress -> look up the route
           -> check the model is allowed                                      -> Call
    limiting.reserve: RPM/TPM                                                 -> Reservation
    router.open_upstream: the translator for (ingress, target), failover inside -> Opened
    relay: the whole reply (`_complete`) or the stream (`streaming.relay_stream`) -> Response
    finish.finish: settle the limits with real usage, one usage record, metrics, log line

An endpoint is its `Ingress` (see `ingress`): it parses the client's body and writes errors in
the client's wire format; nothing else here knows which endpoint it serves, nor which provider.
Everything that can go wrong is a GatewayError. Once a request has been admitted, `finish` ends
it exactly once, whatever happened: on an error here, after a complete reply, or when a stream
is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from random import getrandbits

from blacksheep import Content, Request, Response
from blacksheep.exceptions import MessageAborted
from llm_gateway import limiting
from llm_gateway import observability as obs
from llm_gateway.auth import authenticate
from llm_gateway.call import Call, Outcome
from llm_gateway.chat_request import read_body
from llm_gateway.disconnect import DisconnectWatcher
from llm_gateway.domain import Tenant
from llm_gateway.errors import GatewayError, InternalError, NotFound, PermissionDenied
from llm_gateway.finish import finish
from llm_gateway.ingress import Ingress
from llm_gateway.limiting import Reservation
from llm_gateway.providers.base import for_call
from llm_gateway.router import open_upstream
from llm_gateway.services import Services
from llm_gateway.streaming import relay_stream
from llm_gateway.tokens import OutputTally, encoding_name_for

JSON = b"application/json"
CLIENT_CLOSED = 499
log = logging.getLogger("llm_gateway")

Handler = Callable[[Services, Request, str], Awaitable[Response]]


def endpoint(ingress: Ingress) -> Handler:
    """The handler of a model endpoint: this path, with errors in the ingress's wire format."""

    async def handler(svc: Services, request: Request, rid: str) -> Response:
        try:
            return await serve(svc, ingress, request, rid, client_request_id(request))
        except GatewayError as exc:
            return ingress.error_response(exc)
        except Exception:
            log.exception("unhandled error on %s", request.url.path.decode())
            return ingress.error_response(InternalError("The gateway had an internal error."))

    return handler


async def serve(svc: Services, ingress: Ingress, request: Request, request_id: str,
                client_id: str | None) -> Response:
    t0 = time.perf_counter()
    trace = obs.start_request(request, request_id)
    try:
        call = await _admit(svc, ingress, request, request_id, client_id, trace, t0)
    except MessageAborted:
        trace.end(CLIENT_CLOSED)
        return Response(CLIENT_CLOSED)
    outcome = Outcome()
    reserved = limiting.NOTHING
    try:
        with trace.child("limiter"):
            reserved = await limiting.reserve(svc, call)
        if call.stream:
            return await _stream(svc, call, outcome, reserved, request)
        return await _complete(svc, call, outcome, reserved, request)
    except BaseException as exc:
        _failed(outcome, reserved, exc)
        finish(svc, call, outcome, reserved)
        raise


async def _admit(svc: Services, ingress: Ingress, request: Request, request_id: str,
                 client_id: str | None, trace: obs.RequestTrace, t0: float) -> Call:
    """The request, authenticated, parsed, routed and allowed; a refusal is observed here."""
    tenant: Tenant | None = None
    model = ""
    try:
        with trace.child("auth"):
            key, tenant = await authenticate(svc.catalog, request)
        raw = await read_body(request, svc.settings.max_body_bytes,
                              svc.settings.body_read_timeout_s)
        ask = ingress.parse(raw, svc.settings.max_json_depth)
        model = ask.model
        route = await svc.catalog.route(model)
        if route is None:
            raise NotFound(f"The model `{model}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model")
        if not tenant.may_use(model):
            raise PermissionDenied(f"This API key is not allowed to use the model `{model}`.",
                                   param="model")
        # An ingress whose requests may name the tenant's earlier ones checks they are its own.
        check_access = getattr(ingress, "check_access", None)
        if check_access is not None:
            await check_access(svc, tenant, route, ask)
    except MessageAborted:
        raise
    except GatewayError as exc:
        obs.request_rejected(trace, tenant, model, exc, ingress.endpoint)
        raise
    except Exception:
        obs.request_rejected(trace, tenant, model, InternalError("internal error"),
                             ingress.endpoint)
        raise
    return Call(request_id=request_id, client_request_id=client_id, tenant=tenant,
                key_id=key.key_id, ask=ask, route=route, ingress=ingress,
                encoding=encoding_name_for(model, svc.settings.tokenizer_fallback),
                trace=trace, t0=t0)


def _failed(outcome: Outcome, reserved: Reservation, exc: BaseException) -> None:
    if isinstance(exc, GatewayError):
        outcome.status, outcome.error = exc.status, exc
        exc.headers.update((k.decode(), v.decode()) for k, v in reserved.headers)
    elif isinstance(exc, asyncio.CancelledError):
        outcome.status = CLIENT_CLOSED  # the worker is stopping, or the client left
    else:  # a bug, or an input nobody foresaw: `app` answers 500; the ledger says so too
        outcome.status, outcome.error = 500, InternalError("The gateway had an internal error.")


async def _complete(svc: Services, call: Call, outcome: Outcome, reserved: Reservation,
                    request: Request) -> Response:
    task = asyncio.current_task()
    watcher = DisconnectWatcher(request, task.cancel if task else _noop)
    try:
        opened = await open_upstream(svc, call, outcome.tries)
        try:
            content = await svc.upstream.read_body(opened.response)
        finally:
            opened.response.release()
        outcome.ttft_ms = call.elapsed_ms()
        translator = for_call(opened.translator, svc, call, opened.target)
        out, outcome.usage = translator.parse_response(
            content, call.model, ask=call.ask, prompt_tokens=reserved.prompt_tokens)
    except asyncio.CancelledError:
        return _client_left(svc, call, outcome, reserved, watcher, task)
    finally:
        watcher.stop()
    outcome.status = 200
    # Settling, the usage record, metrics and the span end wait for the next loop iteration:
    # the response goes out first.
    asyncio.get_running_loop().call_soon(finish, svc, call, outcome, reserved)
    return Response(200, list(reserved.headers), Content(JSON, out))


async def _stream(svc: Services, call: Call, outcome: Outcome, reserved: Reservation,
                  request: Request) -> Response:
    task = asyncio.current_task()
    # Until the stream starts, a client that leaves cancels the attempts (and their retries).
    watcher = DisconnectWatcher(request, task.cancel if task else _noop)
    try:
        opened = await open_upstream(svc, call, outcome.tries)
    except asyncio.CancelledError:
        watcher.stop()
        return _client_left(svc, call, outcome, reserved, watcher, task)
    except BaseException:
        watcher.stop()
        raise
    prompt_tokens = reserved.prompt_tokens
    try:
        if not prompt_tokens and opened.translator.announces_prompt:
            prompt_tokens = await call.ingress.count_prompt(call.ask, call.encoding)
        translator = for_call(opened.translator, svc, call, opened.target).stream_translator(
            call.model, call.ask.wants_usage, partial(OutputTally, call.encoding),
            ask=call.ask, prompt_tokens=prompt_tokens)
    except BaseException:
        watcher.stop()
        opened.response.close()
        raise
    return relay_stream(svc, call, outcome, reserved, watcher, opened, translator)


def _client_left(svc: Services, call: Call, outcome: Outcome, reserved: Reservation,
                 watcher: DisconnectWatcher, task: asyncio.Task[object] | None) -> Response:
    if not watcher.disconnected:
        raise asyncio.CancelledError
    if task is not None:
        task.uncancel()
    outcome.status = CLIENT_CLOSED
    finish(svc, call, outcome, reserved)
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
