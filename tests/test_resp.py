"""The limiter's RESP channel: the reply parser at every split point, and a real Redis with a
password, a database number, a lost connection and a silent server."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from llm_gateway.limits.resp import Address, ReplyError, ScriptChannel, _Incomplete, encode, parse

from tests.conftest import RedisServer
from tests.procs import free_port


def test_parse_every_reply_type_at_every_split_point() -> None:
    stream = (b"*6\r\n:1\r\n$0\r\n\r\n$3\r\n1.5\r\n$-1\r\n*1\r\n+OK\r\n*-1\r\n"
              b"-NOSCRIPT No matching script\r\n:-7\r\n")
    expected = [[1, b"", b"1.5", None, [b"OK"], None], "NOSCRIPT No matching script", -7]
    for cut in range(len(stream) + 1):
        buf, pos, got = bytearray(), 0, []
        for piece in (stream[:cut], stream[cut:]):
            buf += piece
            while True:
                try:
                    reply, pos = parse(buf, pos)
                except _Incomplete:
                    break
                got.append(str(reply) if isinstance(reply, ReplyError) else reply)
        assert got == expected, cut


def test_encode_is_resp_bulk_strings() -> None:
    assert encode(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


@pytest.mark.parametrize(("url", "address"), [
    ("redis://h:7000/3", Address("h", 7000, 3)),
    ("rediss://:p%40ss@h", Address("h", 6379, 0, None, "p@ss", True)),
    ("redis://u:p@h:1/0", Address("h", 1, 0, "u", "p")),
    ("unix:///tmp/redis.sock", None),
    ("redis://h/0?ssl_cert_reqs=none", None),
])
def test_address_from_url(url: str, address: Address | None) -> None:
    assert Address.from_url(url) == address


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    """A private redis-server that wants a password."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--requirepass", "s3cret"],
                            stdout=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        yield RedisServer(port, proc)
    finally:
        proc.terminate()
        proc.wait(5)


async def test_password_db_and_concurrent_calls(locked_redis: RedisServer) -> None:
    port = locked_redis.port
    script = "redis.call('SET', KEYS[1], ARGV[1]) return {KEYS[1], tonumber(ARGV[1]) + 1}"
    wrong = ScriptChannel(Address("127.0.0.1", port, 2, None, "nope"), script, _sha(script))
    with pytest.raises(ConnectionError, match=r"WRONGPASS|invalid password"):
        await wrong.call(["k"], [1])
    ch = ScriptChannel(Address("127.0.0.1", port, 2, None, "s3cret"), script, _sha(script))
    replies = await asyncio.gather(*(ch.call([f"k{i}"], [i]) for i in range(200)))
    assert replies == [[f"k{i}".encode(), i + 1] for i in range(200)]
    cli = ("-a", "s3cret", "--no-auth-warning")
    assert locked_redis.cli(*cli, "-n", "2", "GET", "k57") == "57"  # in database 2
    assert locked_redis.cli(*cli, "EXISTS", "k57") == "0"
    # The script was loaded on NOSCRIPT, into the server's script cache.
    assert locked_redis.cli(*cli, "SCRIPT", "EXISTS", _sha(script)) == "1"
    bad = ScriptChannel(Address("127.0.0.1", port, 0, None, "s3cret"),
                        "return redis.call('NOPE')", _sha("return redis.call('NOPE')"))
    with pytest.raises(ReplyError, match="Unknown Redis command"):
        await bad.call(["k"], [])
    await ch.close()
    await bad.close()


async def test_connection_lost_fails_calls_in_flight_and_reconnects(redis: RedisServer) -> None:
    script = "return 1"
    ch = ScriptChannel(Address("127.0.0.1", redis.port), script, _sha(script))
    assert await ch.call(["k"], []) == 1
    pending = asyncio.get_running_loop().create_future()
    ch._waiting.append(pending)  # a call in flight when the server drops us
    assert redis.cli("CLIENT", "KILL", "TYPE", "normal") == "1"
    with pytest.raises(ConnectionError, match="connection lost"):
        await asyncio.wait_for(pending, 2)
    assert ch._transport is None
    assert await ch.call(["k"], []) == 1  # a new connection
    await ch.close()


async def test_silent_server_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        ch = ScriptChannel(Address("127.0.0.1", port), "return 1", _sha("return 1"),
                           timeout_s=0.2)
        t = time.monotonic()
        with pytest.raises(ConnectionError, match="no reply"):
            await ch.call(["k"], [])
        assert time.monotonic() - t < 1.0
        await ch.close()
    finally:
        listener.close()


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # poll interval

