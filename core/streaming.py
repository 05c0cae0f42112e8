"""Relaying an upstream stream to the client as Server-Sent Events.

By the time this runs the router has read the first chunk, so the status (200) is final: from
here a failure cannot become an HTTP error any more. It becomes an OpenAI-style error event
(`data: {"error": ...}`), which the official SDKs raise as an APIError, and the stream ends;
nothing is retried or silently truncated. A client that goes away closes the upstream response
at once, and the usage of what was generated up to the cut is still settled and recorded.
The end of the request (`finish`) runs once the stream is over, whatever ended it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from blacksheep import Response, StreamedContent
from llm_gateway.call import Call
from llm_gateway.disconnect import DisconnectWatcher
from llm_gateway.errors import GatewayError, InternalError, error_body
from llm_gateway.finish import finish
from llm_gateway.providers.base import StreamTranslator
from llm_gateway.router import Opened
from llm_gateway.services import Services

EVENT_STREAM = b"text/event-stream"
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
CLIENT_CLOSED = 499
log = logging.getLogger("llm_gateway.streaming")


def relay_stream(
    svc: Services,
    call: Call,
    watcher: DisconnectWatcher,
    opened: Opened,
    translator: StreamTranslator,
) -> Response:
    resp = opened.response

    # From now on a client that leaves closes the upstream response: generation stops at once.
    watcher.on_disconnect = resp.close

    async def events() -> AsyncIterator[bytes]:
        call.status = 200
        try:
            out = translator.feed(opened.first_chunk)
            call.mark_first_byte()
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
                call.status, call.error = translator.error.status, translator.error
        except GatewayError as exc:
            if watcher.disconnected:
                call.status = CLIENT_CLOSED
            else:
                call.status = exc.status
                yield b"data: " + error_body(exc.message, exc.type, exc.code) + b"\n\n"
        except Exception:
            log.exception("relaying the stream of %s failed", call.request_id)
            call.error = InternalError("The gateway had an internal error.")
            call.status = CLIENT_CLOSED if watcher.disconnected else call.error.status
            if not watcher.disconnected:
                yield b"data: " + call.error.body() + b"\n\n"
        finally:
            try:
                watcher.stop()
                resp.release()
            finally:
                finish(svc, call, translator)

    return Response(
        200, [*call.response_headers, *_SSE_HEADERS], StreamedContent(EVENT_STREAM, events)
    )
