"""Relaying an upstream stream to the client as Server-Sent Events.

By the time this runs the router has read the first chunk, so the status (200) is final: from
here a failure cannot become an HTTP error any more. It becomes an error event in the client's
wire format (the ingress's `stream_error`), which the official SDKs raise as an APIError, and
the stream ends; nothing is retried or silently truncated. A client that goes away closes the
upstream response at once, and the usage of what was generated up to the cut is still settled
and recorded. The end of the request (`finish`) runs once the stream is over, whatever ended it;
also when the body never started (the client left before the response's first message went
out, so the server never asked for the body).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from blacksheep import Response, StreamedContent
from llm_gateway.call import Call, Outcome
from llm_gateway.disconnect import DisconnectWatcher
from llm_gateway.errors import GatewayError, InternalError
from llm_gateway.finish import finish
from llm_gateway.limiting import Reservation
from llm_gateway.providers.base import StreamTranslator
from llm_gateway.router import Opened
from llm_gateway.services import Services

EVENT_STREAM = b"text/event-stream"
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
CLIENT_CLOSED = 499
log = logging.getLogger("llm_gateway.streaming")


class _Ending:
    """Ends the stream's request exactly once: from the body's `finally`, or, when the body
    never started, when the response is dropped (`__del__`)."""

    __slots__ = ("_args", "_done", "_opened", "_watcher")

    def __init__(self, svc: Services, call: Call, outcome: Outcome, reserved: Reservation,
                 watcher: DisconnectWatcher, opened: Opened,
                 translator: StreamTranslator) -> None:
        self._args = (svc, call, outcome, reserved, translator)
        self._watcher = watcher
        self._opened = opened
        self._done = False

    def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._watcher.stop()
            self._opened.response.release()
        finally:
            finish(*self._args)

    def __del__(self) -> None:
        if self._done:
            return
        # The body never ran: the client was gone before the response started.
        self._args[2].status = CLIENT_CLOSED
        try:
            asyncio.get_running_loop().call_soon(self)
        except RuntimeError:  # no loop here any more (a worker stopping): end it now
            try:
                self()
            except Exception:
                log.exception("ending an unstarted stream failed")


def relay_stream(
    svc: Services,
    call: Call,
    outcome: Outcome,
    reserved: Reservation,
    watcher: DisconnectWatcher,
    opened: Opened,
    translator: StreamTranslator,
) -> Response:
    resp = opened.response
    # A translator that knows its stream's state (sequence numbers, open items) ends it itself.
    end_with = getattr(translator, "fail", None) or call.ingress.stream_error
    # From now on a client that leaves closes the upstream response: generation stops at once.
    watcher.on_disconnect = resp.close
    ending = _Ending(svc, call, outcome, reserved, watcher, opened, translator)

    async def events() -> AsyncIterator[bytes]:
        outcome.status = 200
        try:
            out = translator.feed(opened.first_chunk)
            outcome.ttft_ms = call.elapsed_ms()
            if out:
                yield out
            tally = translator.generated
            async for chunk in svc.upstream.chunks(resp):
                out = translator.feed(chunk)
                if out:
                    yield out
                if tally.full():  # counting lags: read the upstream no faster than it
                    await tally.room()
            yield translator.finish()
            if translator.error is not None:  # the upstream failed inside the stream
                outcome.status, outcome.error = translator.error.status, translator.error
        except GatewayError as exc:
            if watcher.disconnected:
                outcome.status = CLIENT_CLOSED
            else:
                outcome.status = exc.status
                yield end_with(exc)
        except Exception:
            log.exception("relaying the stream of %s failed", call.request_id)
            outcome.error = InternalError("The gateway had an internal error.")
            outcome.status = CLIENT_CLOSED if watcher.disconnected else outcome.error.status
            if not watcher.disconnected:
                yield end_with(outcome.error)
        finally:
            ending()

    return Response(
        200, [*reserved.headers, *_SSE_HEADERS], StreamedContent(EVENT_STREAM, events)
    )
