"""The asyncio client library against the fake core of test_api_server.

The same behaviours test_api_client checks for the threaded client: the
two must raise the same errors for the same replies and lose no connection.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from daemon.api.aio import AsyncConnection, AsyncSpliceClient, DaemonGone, SpliceError
from tests.test_api_server import (
    ECHO,
    SILENT_HOST,
    UNREACHABLE_HOST,
    Daemon,
    pattern,
    running_daemon,
    sock_dir,
)

__all__ = ["sock_dir"]  # the fixture, re-exported for pytest

T = TypeVar("T")


@pytest.fixture
def daemon(sock_dir: str) -> Iterator[Daemon]:
    with running_daemon(os.path.join(sock_dir, "spliced.sock")) as d:
        yield d


def run(daemon: Daemon, body: Callable[[AsyncSpliceClient], Awaitable[T]]) -> T:
    """Attach in a fresh event loop, run ``body``, detach."""

    async def main() -> T:
        async with await AsyncSpliceClient.open(daemon.path) as api:
            async with asyncio.timeout(20):
                return await body(api)

    return asyncio.run(main())


async def recv_exactly(conn: AsyncConnection, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await conn.recv(n - len(out))
        assert chunk, "EOF before all data arrived"
        out += chunk
    return bytes(out)


def test_attach_says_hello(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> dict[str, object]:
        return api.server_info

    info = run(daemon, body)
    assert info["version"] == 1
    assert "connect_splice" in info["ops"]  # type: ignore[operator]


def test_listen_accept_connect_carry_data_both_ways(daemon: Daemon) -> None:
    data = pattern(150_000)

    async def body(api: AsyncSpliceClient) -> None:
        lst = await api.listen(("192.0.2.1", 1080))
        assert lst.addr == ("192.0.2.1", 1080)
        accepted = asyncio.ensure_future(lst.accept())
        out = await api.connect(("192.0.2.1", 1080), local=("198.51.100.1", 40001))
        inc = await accepted
        assert out.peer == ("192.0.2.1", 1080) == inc.local
        assert inc.peer == ("198.51.100.1", 40001) == out.local
        sending = asyncio.ensure_future(out.sendall(data))
        got = await recv_exactly(inc, len(data))
        await sending
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        await inc.sendall(b"reply")
        inc.shutdown()
        assert await recv_exactly(out, 5) == b"reply"
        assert await out.recv(1) == b""
        assert (await api.stats(out))["bytes_out"] == len(data)
        assert await out.recv(10, socket.MSG_PEEK) == b""  # flags reach recv(2)
        await inc.close()
        await out.close()
        await lst.close()
        assert (await api.list())["conns"] == []

    run(daemon, body)


def test_many_tasks_share_one_client(daemon: Daemon) -> None:
    async def echo(api: AsyncSpliceClient, i: int) -> bool:
        async with await api.connect(ECHO) as conn:
            data = pattern(10_000 + i)
            await conn.sendall(data)
            return await recv_exactly(conn, len(data)) == data

    async def body(api: AsyncSpliceClient) -> None:
        assert all(await asyncio.gather(*(echo(api, i) for i in range(64))))
        assert (await api.list())["conns"] == []

    run(daemon, body)


def test_cancelled_accept_loses_no_connection(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> None:
        lst = await api.listen(("192.0.2.1", 81))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await lst.accept()
        out = await api.connect(("192.0.2.1", 81))
        conn = await lst.accept()  # the abandoned request is the one that completes
        await out.sendall(b"hi")
        assert await recv_exactly(conn, 2) == b"hi"
        await conn.close()
        await out.close()
        assert (await api.list())["conns"] == []

    run(daemon, body)


def test_cancelled_connect_is_released_in_the_daemon(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> None:
        task = asyncio.ensure_future(api.connect(ECHO))
        await asyncio.sleep(0)  # the request is sent; cancel before the reply is read
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while (await api.list())["conns"]:
            assert time.monotonic() < deadline, "the late connection was never closed"
            await asyncio.sleep(0.01)

    run(daemon, body)


@pytest.mark.parametrize(
    ("remote", "code"),
    [
        (("203.0.113.2", 80), "ECONNREFUSED"),
        ((UNREACHABLE_HOST, 80), "EHOSTUNREACH"),
        ((SILENT_HOST, 80), "ETIMEDOUT"),
    ],
)
def test_connect_errors_carry_code_and_errno(
    daemon: Daemon, remote: tuple[str, int], code: str
) -> None:
    async def body(api: AsyncSpliceClient) -> SpliceError:
        with pytest.raises(SpliceError) as info:
            await api.connect(remote, timeout=1)
        return info.value

    error = run(daemon, body)
    assert error.code == code
    assert error.errno == getattr(errno, code)


def test_request_the_daemon_rejects_raises_ebadreq(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> SpliceError:
        with pytest.raises(SpliceError) as info:
            await api.listen(("not-an-address", 80))
        return info.value

    error = run(daemon, body)
    assert error.code == "EBADREQ" and error.errno is None


def test_close_frees_the_id_and_release_does_too(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> None:
        conn = await api.connect(ECHO)
        assert (await api.stats(conn))["state"] == "ESTABLISHED"
        await conn.close()
        with pytest.raises(SpliceError) as info:
            await api.stats(conn.id)
        assert info.value.code == "ENOENT"
        await conn.close()  # closing twice is quiet, like a socket
        other = await api.connect(ECHO)
        other.release()
        assert (await api.list())["conns"] == []  # replies come in order

    run(daemon, body)


def test_another_clients_connection_is_eperm(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> None:
        async with await AsyncSpliceClient.open(daemon.path) as other:
            conn = await api.connect(ECHO)
            for attempt in (other.stats, other.shutdown, other.intend_splice):
                with pytest.raises(SpliceError) as info:
                    await attempt(conn.id)
                assert info.value.code == "EPERM"
            await conn.close()

    run(daemon, body)


def test_intend_splice_gives_an_unconnected_server_side(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> None:
        cli = await api.connect(ECHO)
        srv = await api.intend_splice(cli)
        with pytest.raises(SpliceError) as info:
            srv.sock.fileno()
        assert info.value.code == "ESTATE"
        await srv.connect(ECHO)
        await srv.sendall(b"via server side")
        assert await recv_exactly(srv, 15) == b"via server side"
        with pytest.raises(SpliceError) as info:
            await srv.connect(ECHO)
        assert info.value.code == "ESTATE"
        await cli.close()
        await srv.close()

    run(daemon, body)


def test_events_are_queued(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> None:
        conn = await api.connect(ECHO)
        daemon.loop.call(lambda: daemon.core.reset(conn.id))
        assert await api.next_event(timeout=5) == {"event": "reset", "conn": conn.id}
        assert await api.next_event(timeout=0) is None
        await conn.close()  # the id is gone in the daemon already: quiet

    run(daemon, body)


def test_daemon_going_away_fails_pending_and_later_calls_promptly(daemon: Daemon) -> None:
    async def body(api: AsyncSpliceClient) -> None:
        lst = await api.listen(("192.0.2.1", 82))
        waiting = asyncio.ensure_future(lst.accept())
        # The accept is in flight once the daemon has seen it; poll for that, no sleep.
        while not daemon.loop.call(
            lambda: any(lst.waiting for lst in daemon.core.listeners.values())
        ):
            await asyncio.sleep(0.001)
        started = time.monotonic()
        daemon.loop.call(daemon.server.close)
        with pytest.raises(DaemonGone) as info:
            await waiting
        assert time.monotonic() - started < 2
        assert info.value.code == "EDISCONNECTED"
        with pytest.raises(DaemonGone):
            await api.stats()
        assert api.closed
        assert [e async for e in api.events()] == []  # no timeout given, yet it ends

    run(daemon, body)


def test_attaching_to_a_missing_daemon_fails(sock_dir: str) -> None:
    async def main() -> None:
        await AsyncSpliceClient.open(os.path.join(sock_dir, "nobody-home.sock"))

    with pytest.raises(FileNotFoundError):
        asyncio.run(main())
