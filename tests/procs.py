"""Start real server processes for tests: a free port, start, wait for health, stop.

    with running([sys.executable, "-m", "pkg", "--port", str(port)], health_url) as proc:
        ...

Run a function in forked children and collect what they return (`forked`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def running(
    command: Sequence[str],
    health_url: str,
    *,
    deadline_s: float = 15.0,
    env: dict[str, str] | None = None,
    output: IO[bytes] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` until the block ends; enter only once `health_url` answers 200. Its
    stdout and stderr go to `output` (read it with `read_output`), or to a private temp file."""
    with contextlib.nullcontext(output) if output is not None else tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # its own process group: whatever it forks (workers, writer) is stopped with it
            start_new_session=True,
        )
        try:
            _wait_healthy(proc, " ".join(command), health_url, deadline_s, log)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # strays of a parent that died hard


def read_output(f: IO[bytes]) -> str:
    """What a process wrote to `f` so far. pread: the child shares the file offset, so a seek
    here would move where it writes next."""
    fd = f.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def _wait_healthy(
    proc: subprocess.Popen[bytes], name: str, url: str, deadline_s: float, log: IO[bytes]
) -> None:
    deadline = time.monotonic() + deadline_s
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            output = log.read().decode(errors="replace")
            state = f"exited with {proc.returncode}" if proc.returncode is not None else "timed out"
            raise RuntimeError(f"{name} {state} before {url} was healthy:\n{output}")
        time.sleep(0.05)  # poll interval, not a guess at start-up time


class ChildFailed(AssertionError):
    """A forked child raised or died before returning: its exit code and traceback."""


def forked(target: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *,
           deadline_s: float = 60.0) -> list[Any]:
    """`target(*args)` in one forked child per `args` in `calls`; their return values. The
    first child to raise or die fails the caller at once with its exit code and traceback (not
    a bare `queue.Empty` much later), and the other children are stopped: none is left waiting
    at a barrier for it, nor holds up the end of the test session."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_report, args=(out, i, target, args), daemon=True)
             for i, args in enumerate(calls)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + deadline_s
    try:
        while len(results) < len(procs):
            i, ok, value = _next_report(procs, results, out, deadline)
            if not ok:
                procs[i].join(5)
                raise ChildFailed(f"child {i} (pid {procs[i].pid}) raised, exit code "
                                  f"{procs[i].exitcode}:\n{value}")
            results[i] = value
        for p in procs:
            p.join(10)
            assert p.exitcode == 0, f"child pid {p.pid}: exit code {p.exitcode} after its result"
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [results[i] for i in range(len(procs))]


def _next_report(procs: list[Any], results: dict[int, Any], out: Any,
                 deadline: float) -> tuple[int, bool, Any]:
    """The next (child index, ok, result or traceback); ChildFailed for a child that exited
    without a word, or when time is up."""
    while True:
        try:
            return out.get(timeout=0.1)  # type: ignore[no-any-return]  # poll: check children
        except queue.Empty:
            pass
        silent = [(i, p) for i, p in enumerate(procs)
                  if i not in results and p.exitcode is not None]
        if silent:
            try:  # a child flushes its queue before it exits: a result sent is here by now
                return out.get(timeout=1.0)  # type: ignore[no-any-return]
            except queue.Empty:
                i, p = silent[0]
                raise ChildFailed(f"child {i} (pid {p.pid}) exited with code {p.exitcode} "
                                  "without a result (its stderr is in the captured output)"
                                  ) from None
        if time.monotonic() > deadline:
            waiting = [p.pid for i, p in enumerate(procs) if i not in results]
            raise ChildFailed(f"no result in time from children {waiting} (still running)")


def _report(out: Any, i: int, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = target(*args)
    except BaseException:
        out.put((i, False, traceback.format_exc()))
        out.close()
        out.join_thread()  # the traceback reaches the parent before this process exits
        os._exit(1)
    out.put((i, True, result))

