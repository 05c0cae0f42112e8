"""The end of a streamed request runs exactly once, also when its body never starts."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.call import Call, Outcome
from llm_gateway.chat_request import CHAT
from llm_gateway.domain import Route, Target, Tenant, Usage
from llm_gateway.ingress import Ask
from llm_gateway.limiting import Reservation
from llm_gateway.router import Opened
from llm_gateway.streaming import relay_stream
from llm_gateway.tokens import OutputTally

TARGET = Target("openai", "http://upstream.invalid/v1", "m")


@dataclass
class FakeResponse:
    released: int = 0
    closed: int = 0

    def release(self) -> None:
        self.released += 1

    def close(self) -> None:
        self.closed += 1


@dataclass
class FakeWatcher:
    stopped: int = 0
    disconnected: bool = False
    on_disconnect: Any = None

    def stop(self) -> None:
        self.stopped += 1


@dataclass
class FakeTranslator:
    error: Any = None
    generated: OutputTally = field(default_factory=lambda: OutputTally("cl100k_base"))

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b"data: [DONE]\n\n"

    def usage(self) -> Usage:
        return Usage(3, 2, reported=True)


@dataclass
class FakeUpstream:
    async def chunks(self, resp: Any) -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"


@dataclass
class Sink:
    records: list[Any] = field(default_factory=list)

    def emit(self, record: Any) -> None:
        self.records.append(record)


@dataclass
class Svc:
    usage: Sink = field(default_factory=Sink)
    upstream: FakeUpstream = field(default_factory=FakeUpstream)


def _relay() -> tuple[Any, Svc, FakeResponse, FakeWatcher, Outcome]:
    call = Call(request_id="req_s", client_request_id=None, tenant=Tenant("t", 0, 0),
                key_id="k", ask=Ask("m", True, None, False, {}, b""), route=Route("m", ()),
                ingress=CHAT, encoding="cl100k_base")
    outcome, svc, resp, watcher = Outcome(), Svc(), FakeResponse(), FakeWatcher()
    opened = Opened(None, resp, b"data: {}\n\n", TARGET, 1)  # type: ignore[arg-type]
    response = relay_stream(svc, call, outcome, Reservation(), watcher,  # type: ignore[arg-type]
                            opened, FakeTranslator())  # type: ignore[arg-type]
    return response, svc, resp, watcher, outcome


async def test_a_body_that_never_starts_still_ends_the_request_once() -> None:
    # BlackSheep sends the response's start message before it asks for the body: when that
    # send fails (the client is gone), the body generator never runs, nor its `finally`.
    response, svc, resp, watcher, outcome = _relay()
    del response
    gc.collect()
    await asyncio.sleep(0)
    assert [r["status"] for r in svc.usage.records] == [499]
    assert (resp.released, watcher.stopped) == (1, 1)
    assert outcome.finished
    gc.collect()
    await asyncio.sleep(0)
    assert len(svc.usage.records) == 1


async def test_a_relayed_stream_ends_the_request_once() -> None:
    response, svc, resp, watcher, outcome = _relay()
    body = b"".join([part async for part in response.content.generator()])
    assert body == b"data: {}\n\ndata: {}\n\ndata: [DONE]\n\n"
    del response
    gc.collect()
    await asyncio.sleep(0)
    assert [(r["status"], r["input_tokens"], r["output_tokens"])
            for r in svc.usage.records] == [(200, 3, 2)]
    assert (resp.released, watcher.stopped) == (1, 1)
    assert outcome.ttft_ms is not None
