"""Noticing that a client went away.

Granian does not tell the application when a client disconnects (FACTS §2): a response keeps
being produced for nobody, and the upstream keeps generating tokens that get billed. Once the
request body has been read, the only thing left to receive on the ASGI channel is
`http.disconnect`, so one small task waits for it and runs a callback at once: closing the
upstream response (a stream) or cancelling the handler (a non-stream request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from blacksheep import Request


class DisconnectWatcher:
    __slots__ = ("_task", "disconnected", "on_disconnect")

    def __init__(self, request: Request, on_disconnect: Callable[[], object]) -> None:
        self.disconnected = False
        self.on_disconnect = on_disconnect
        receive = request.content.receive if request.content is not None else None
        self._task = asyncio.ensure_future(self._watch(receive)) if receive else None

    async def _watch(self, receive: Callable[[], object]) -> None:
        while True:
            message = await receive()  # type: ignore[misc]
            if isinstance(message, dict) and message.get("type") == "http.disconnect":
                self.disconnected = True
                self.on_disconnect()
                return

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
