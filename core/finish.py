"""The end of a request: count what the upstream did not report, settle the limits, emit the
usage record, then metrics, span and log line.

`finish` is called once per request that reached the limiter, from wherever the request ended
(an error, a complete reply, the end or cut of a stream); a second call does nothing. It never
raises, and each step runs whatever the step before it raised, so no failure loses a record.
Counting a large prompt or reply runs in a counting thread, inside a task tracked here:
`drain` waits for those before a worker flushes its usage sink and stops.
"""

from __future__ import annotations

import asyncio
import logging

from llm_gateway import limiting
from llm_gateway import observability as obs
from llm_gateway.call import Call, Outcome
from llm_gateway.limiting import Reservation
from llm_gateway.providers.base import StreamTranslator, Tally
from llm_gateway.services import Services
from llm_gateway.tokens import count_texts
from llm_gateway.usage import usage_record

log = logging.getLogger("llm_gateway.finish")
CLIENT_CLOSED = 499
_pending: set[asyncio.Task[None]] = set()


def finish(svc: Services, call: Call, outcome: Outcome, reserved: Reservation,
           stream: StreamTranslator | None = None) -> None:
    """End `call` (a stream's translator gives its usage); counting, when needed, goes to a
    tracked task and the other steps follow it there."""
    if outcome.finished:
        return
    outcome.finished = True
    generated: Tally | None = None
    try:
        if stream is not None:
            outcome.usage = stream.usage()
            generated = stream.generated
        if _must_count(outcome):
            task = asyncio.ensure_future(_count_then_end(svc, call, outcome, reserved, generated))
            _pending.add(task)
            task.add_done_callback(_pending.discard)
            return
    except Exception:
        log.exception("reading the usage of %s failed", call.request_id)
    _end(svc, call, outcome, reserved)


def _must_count(outcome: Outcome) -> bool:
    # The upstream reported nothing valid (a self-hosted server, a cut stream): count here.
    return (not outcome.usage.reported and outcome.status in (200, CLIENT_CLOSED)
            and outcome.target is not None)


async def _count_then_end(svc: Services, call: Call, outcome: Outcome, reserved: Reservation,
                          generated: Tally | None) -> None:
    usage = outcome.usage
    try:
        if generated is not None:
            usage.output_tokens = await generated.total()
        elif usage.generated:
            usage.output_tokens = await count_texts(usage.generated, call.encoding)
            usage.generated = ()
        if not usage.input_tokens:
            usage.input_tokens = (reserved.prompt_tokens
                                  or await call.ingress.count_prompt(call.ask, call.encoding))
    except Exception:
        log.exception("counting the usage of %s failed", call.request_id)
    finally:
        _end(svc, call, outcome, reserved)


def _end(svc: Services, call: Call, outcome: Outcome, reserved: Reservation) -> None:
    for step in (_settle, _record, _observe):
        try:
            step(svc, call, outcome, reserved)
        except Exception:
            log.exception("ending %s: %s failed", call.request_id, step.__name__)


def _settle(svc: Services, call: Call, outcome: Outcome, reserved: Reservation) -> None:
    limiting.settle(svc, call, reserved, outcome.usage.input_tokens + outcome.usage.output_tokens)


def _record(svc: Services, call: Call, outcome: Outcome, reserved: Reservation) -> None:
    svc.usage.emit(usage_record(call, outcome))


def _observe(svc: Services, call: Call, outcome: Outcome, reserved: Reservation) -> None:
    obs.request_finished(call, outcome)


async def drain(timeout_s: float) -> None:
    """Wait (up to `timeout_s`) for requests whose end is still being counted."""
    if _pending:
        await asyncio.wait(set(_pending), timeout=timeout_s)
