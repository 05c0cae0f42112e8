"""`deadline(seconds)`: `asyncio.timeout` for the request path, without a timer per use.

    with deadline(30.0):
        await something()  # TimeoutError if it has not finished within 30 s

The same contract as `asyncio.timeout(delay)` (Python 3.11+): on expiry the current task is
cancelled, and the `CancelledError` that reaches the block's end becomes `TimeoutError`, unless
the task was also cancelled from elsewhere meanwhile (then the cancellation goes on, as it
must).

The request path enters three per request (the client's body, the upstream's headers, its body
or first chunk), each with a delay fixed by the settings, and `asyncio.timeout` costs about
5 µs each on uvloop (a timer armed and disarmed). Deadlines of one delay expire in the order
they were entered, so each delay keeps its entries in a FIFO with one timer, armed for the
oldest live entry: leaving a block only marks its entry; when the timer fires, finished
entries are dropped from the head, due ones expire, and the timer is armed again for the new
head. Every deadline fires at its exact time, as asyncio.timeout's would.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class deadline:
    __slots__ = ("_cancelling", "_delay", "_expired", "_fifo", "_live", "_task", "when")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._expired = False
        self._live = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("deadline() should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = task.get_loop()
        self.when = loop.time() + self._delay
        self._live = True
        self._fifo = _fifo(loop, self._delay)
        self._fifo.add(self)

    def expire(self) -> None:
        self._live = False
        self._expired = True
        self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live:
            self._live = False
            self._fifo.left()
        if self._expired and self._task.uncancel() <= self._cancelling and \
                exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
        del self._task  # an entry may wait in its FIFO for a while: it holds nothing

    @property
    def live(self) -> bool:
        return self._live


class _Fifo:
    """The live deadlines of one delay on one loop, oldest first, and the timer of the head."""

    __slots__ = ("_entries", "_live", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._entries: deque[deadline] = deque()
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, d: deadline) -> None:
        entries = self._entries
        if len(entries) > 1024 and len(entries) > 4 * self._live:
            # A long-lived head keeps finished entries behind it: drop them (amortized O(1)).
            self._entries = entries = deque(e for e in entries if e.live)
        entries.append(d)
        self._live += 1
        if self._timer is None:
            self._timer = self._loop.call_at(d.when, self._fire)

    def left(self) -> None:
        """An entry's block ended before its deadline: drop finished entries at the head."""
        self._live -= 1
        entries = self._entries
        while entries and not entries[0].live:
            entries.popleft()

    def _fire(self) -> None:
        self._timer = None
        entries = self._entries
        now = self._loop.time()
        while entries:
            head = entries[0]
            if not head.live:
                entries.popleft()
            elif head.when <= now:
                entries.popleft()
                self._live -= 1
                head.expire()
            else:
                self._timer = self._loop.call_at(head.when, self._fire)
                return


_fifos: dict[float, _Fifo] = {}


def _fifo(loop: asyncio.AbstractEventLoop, delay: float) -> _Fifo:
    fifo = _fifos.get(delay)
    if fifo is None or fifo._loop is not loop:  # a new loop (a test's asyncio.run): start over
        if len(_fifos) > 64:
            _fifos.clear()
        fifo = _fifos[delay] = _Fifo(loop)
    return fifo
