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
from llm_gateway.call import Call
from llm_gateway.providers.base import StreamTranslator
from llm_gateway.services import Services
from llm_gateway.tokens import OutputTally, count_prompt, count_texts
from llm_gateway.usage import usage_record

log = logging.getLogger("llm_gateway.finish")
CLIENT_CLOSED = 499
_pending: set[asyncio.Task[None]] = set()


def finish(svc: Services, call: Call, stream: StreamTranslator | None = None) -> None:
    """End `call` (a stream's translator gives its usage); counting, when needed, goes to a
    tracked task and the other steps follow it there."""
    if call.finished:
        return
    call.finished = True
    generated: OutputTally | None = None
    try:
        if stream is not None:
            call.usage = stream.usage()
            generated = stream.generated
        if _must_count(call):
            task = asyncio.ensure_future(_count_then_end(svc, call, generated))
            _pending.add(task)
            task.add_done_callback(_pending.discard)
            return
    except Exception:
        log.exception("reading the usage of %s failed", call.request_id)
    _end(svc, call)


def _must_count(call: Call) -> bool:
    # The upstream reported nothing valid (a self-hosted server, a cut stream): count here.
    return (not call.usage.reported and call.status in (200, CLIENT_CLOSED)
            and call.target is not None)


async def _count_then_end(svc: Services, call: Call, generated: OutputTally | None) -> None:
    usage = call.usage
    try:
        if generated is not None:
            usage.output_tokens = await generated.total()
        elif usage.generated:
            usage.output_tokens = await count_texts(usage.generated, call.encoding)
            usage.generated = ()
        if not usage.input_tokens:
            if not call.prompt_tokens:
                call.prompt_tokens = await count_prompt(call.body, call.encoding, len(call.raw))
            usage.input_tokens = call.prompt_tokens
    except Exception:
        log.exception("counting the usage of %s failed", call.request_id)
    finally:
        _end(svc, call)


def _end(svc: Services, call: Call) -> None:
    for step in (_settle, _record, _observe):
        try:
            step(svc, call)
        except Exception:
            log.exception("ending %s: %s failed", call.request_id, step.__name__)


def _settle(svc: Services, call: Call) -> None:
    limiting.settle(svc, call)


def _record(svc: Services, call: Call) -> None:
    svc.usage.emit(usage_record(call))


def _observe(svc: Services, call: Call) -> None:
    obs.request_finished(call)


async def drain(timeout_s: float) -> None:
    """Wait (up to `timeout_s`) for requests whose end is still being counted."""
    if _pending:
        await asyncio.wait(set(_pending), timeout=timeout_s)
