"""`deadline` keeps `asyncio.timeout`'s contract: TimeoutError at the delay, nothing when the
block ends in time, an outside cancellation left alone, and bounded memory under load."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from llm_gateway import deadline as dl
from llm_gateway.deadline import deadline


async def _within(delay: float, work_s: float) -> str:
    try:
        with deadline(delay):
            await asyncio.sleep(work_s)
    except TimeoutError:
        return "timeout"
    return "done"


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run])
def test_expires_at_the_delay_and_only_then(run: object) -> None:
    async def main() -> None:
        t0 = time.monotonic()
        assert await _within(0.05, 1.0) == "timeout"
        assert 0.05 <= time.monotonic() - t0 < 0.5
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        # Interleaved deadlines of two delays, some ending in time: each fires for itself.
        got = await asyncio.gather(_within(0.1, 0.05), _within(0.1, 0.2), _within(0.1, 0.01),
                                   _within(0.1, 0.3), _within(0.2, 0.1), _within(0.05, 0.1))
        assert got == ["done", "timeout", "done", "timeout", "done", "timeout"]

    run(main())  # type: ignore[operator]


def test_an_outside_cancellation_stays_a_cancellation() -> None:
    async def main() -> None:
        async def body() -> None:
            with deadline(0.05):
                await asyncio.sleep(1)

        task = asyncio.ensure_future(body())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_finished_entries_do_not_pile_up_behind_a_long_one() -> None:
    async def main() -> None:
        long = asyncio.ensure_future(_within(7.5, 0.3))
        await asyncio.sleep(0)
        for _ in range(50_000):
            with deadline(7.5):
                await asyncio.sleep(0)
        fifo = dl._fifos[7.5]
        assert len(fifo._entries) <= 4 * 1024 + 1
        assert await long == "done"
        with deadline(7.5):
            pass
        assert len(fifo._entries) == 0 and fifo._live == 0

    asyncio.run(main())
