"""Noticing that a client went away.

Granian does not tell the application when a client disconnects (FACTS §2): a response keeps
being produced for nobody, and the upstream keeps generating tokens that get billed. Once the
request body has been read, the only thing left to receive on the ASGI channel is
`http.disconnect`, so one small task waits for it and runs a callback at once: closing the
upstream response (a stream) or cancelling the handler (a non-stream request).

The task starts only once a request has lasted `WATCH_AFTER_S`: most of a task's cost (creating
it, then cancelling its pending `receive()` through Granian) would otherwise be paid by every
short request, which is over before a disconnect could matter. A client that leaves is noticed
within that delay plus a few milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from blacksheep import Request

WATCH_AFTER_S = 0.1


class DisconnectWatcher:
    __slots__ = ("_task", "_timer", "disconnected", "on_disconnect")

    def __init__(self, request: Request, on_disconnect: Callable[[], object]) -> None:
        self.disconnected = False
        self.on_disconnect = on_disconnect
        self._task: asyncio.Future[None] | None = None
        # The server's body reader (an ASGI `receive`), which BlackSheep's `Content` type does
        # not declare.
        receive = getattr(request.content, "receive", None)
        self._timer = (asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start, receive)
                       if receive else None)

    def _start(self, receive: Callable[[], object]) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Callable[[], object]) -> None:
        while True:
            message = await receive()  # type: ignore[misc]
            if isinstance(message, dict) and message.get("type") == "http.disconnect":
                self.disconnected = True
                self.on_disconnect()
                return

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
