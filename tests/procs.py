"""Start real server processes for tests: a free port, start, wait for health, stop.

    with running([sys.executable, "-m", "pkg", "--port", str(port)], health_url) as proc:
        ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO


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
