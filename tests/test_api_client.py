"""The client library proxies import, against the fake core of test_api_server."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemon.api.client import Connection, DaemonGone, SpliceClient, SpliceError
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


@pytest.fixture
def daemon(sock_dir: str) -> Iterator[Daemon]:
    with running_daemon(os.path.join(sock_dir, "spliced.sock")) as d:
        yield d


@pytest.fixture
def api(daemon: Daemon) -> Iterator[SpliceClient]:
    with SpliceClient(daemon.path) as client:
        yield client


def recv_exactly(conn: Connection, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        assert k, "EOF before all data arrived"
        got += k
    return bytes(buf)


def test_attach_says_hello(api: SpliceClient) -> None:
    assert api.server_info["version"] == 1
    assert "intend_splice" in api.server_info["ops"]  # type: ignore[operator]


def test_listen_accept_connect_carry_data_both_ways(api: SpliceClient) -> None:
    lst = api.listen(("192.0.2.1", 1080))
    assert lst.addr == ("192.0.2.1", 1080)
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(lst.accept, 5)
        out = api.connect(("192.0.2.1", 1080), local=("198.51.100.1", 40001))
        inc = accepted.result(timeout=5)
    assert out.peer == ("192.0.2.1", 1080) == inc.local
    assert inc.peer == ("198.51.100.1", 40001) == out.local
    inc.settimeout(5)
    out.settimeout(5)
    data = pattern(150_000)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(out.sendall, data)
        assert (
            hashlib.sha256(recv_exactly(inc, len(data))).digest() == hashlib.sha256(data).digest()
        )
    inc.sendall(b"reply")
    inc.shutdown()
    assert recv_exactly(out, 5) == b"reply"
    assert out.recv(1) == b""
    assert api.stats(out)["bytes_out"] == len(data)
    inc.close()
    out.close()
    lst.close()


def test_connection_fileno_works_with_select(api: SpliceClient) -> None:
    with api.connect(ECHO) as conn:
        conn.send(b"x")
        readable, _, _ = select.select([conn], [], [], 5)
        assert readable == [conn]
        assert conn.sock.recv(1) == b"x"


def test_accept_in_one_thread_while_others_call(api: SpliceClient) -> None:
    lst = api.listen(("192.0.2.1", 80))
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(lst.accept)
        assert api.stats()["listeners"] == 1  # not held up by the waiting accept
        assert not accepted.done()
        with api.connect(("192.0.2.1", 80)):
            accepted.result(timeout=5).close()


def test_many_threads_share_one_client(api: SpliceClient) -> None:
    def echo(i: int) -> bool:
        with api.connect(ECHO) as conn:
            conn.settimeout(5)
            data = pattern(10_000 + i)
            conn.sendall(data)
            return recv_exactly(conn, len(data)) == data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(echo, range(32)))
    assert api.list()["conns"] == []


def test_accept_timeout_loses_no_connection(api: SpliceClient) -> None:
    lst = api.listen(("192.0.2.1", 81))
    with pytest.raises(TimeoutError):
        lst.accept(timeout=0.05)
    with api.connect(("192.0.2.1", 81)) as out:
        conn = lst.accept(timeout=5)  # the earlier request is the one that completes
        out.sendall(b"hi")
        conn.settimeout(5)
        assert recv_exactly(conn, 2) == b"hi"
        conn.close()
    assert len(api.list()["conns"]) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("remote", "code"),
    [
        (("203.0.113.2", 80), "ECONNREFUSED"),
        ((UNREACHABLE_HOST, 80), "EHOSTUNREACH"),
        ((SILENT_HOST, 80), "ETIMEDOUT"),
    ],
)
def test_connect_errors_carry_code_and_errno(
    api: SpliceClient, remote: tuple[str, int], code: str
) -> None:
    with pytest.raises(SpliceError) as info:
        api.connect(remote, timeout=1)
    assert info.value.code == code
    assert info.value.errno == getattr(errno, code)


def test_request_the_daemon_rejects_raises_ebadreq(api: SpliceClient) -> None:
    with pytest.raises(SpliceError) as info:
        api.listen(("not-an-address", 80))
    assert info.value.code == "EBADREQ" and info.value.errno is None


def test_close_frees_the_id(api: SpliceClient) -> None:
    conn = api.connect(ECHO)
    assert api.stats(conn)["state"] == "ESTABLISHED"
    assert [c["conn"] for c in api.list()["conns"]] == [conn.id]  # type: ignore[attr-defined]
    conn.close()
    with pytest.raises(SpliceError) as info:
        api.stats(conn.id)
    assert info.value.code == "ENOENT"
    conn.close()  # closing twice is quiet, like a socket


def test_abort_frees_the_id_and_reaches_the_core(daemon: Daemon, api: SpliceClient) -> None:
    conn = api.connect(ECHO)
    conn.abort()
    assert daemon.loop.call(lambda: list(daemon.core.aborted)) == [conn.id]
    with pytest.raises(SpliceError) as info:
        api.stats(conn.id)
    assert info.value.code == "ENOENT"
    conn.abort()  # quiet the second time, like close
    conn.close()


def test_another_clients_connection_is_eperm(daemon: Daemon, api: SpliceClient) -> None:
    with SpliceClient(daemon.path) as other, api.connect(ECHO) as conn:
        for attempt in (other.stats, other.shutdown, other.intend_splice):
            with pytest.raises(SpliceError) as info:
                attempt(conn.id)
            assert info.value.code == "EPERM"


def test_intend_splice_gives_an_unconnected_server_side(api: SpliceClient) -> None:
    cli = api.connect(ECHO)
    srv = api.intend_splice(cli)
    with pytest.raises(SpliceError) as info:
        srv.fileno()
    assert info.value.code == "ESTATE"
    srv.connect(ECHO)
    srv.sendall(b"via server side")
    srv.settimeout(5)
    assert recv_exactly(srv, 15) == b"via server side"
    with pytest.raises(SpliceError) as info:
        api.splice(cli, srv, 0)
    assert info.value.code == "EUNKNOWNOP"  # part 2: the fake core does not splice yet
    cli.close()
    srv.close()


def test_events_are_queued(daemon: Daemon, api: SpliceClient) -> None:
    conn = api.connect(ECHO)
    daemon.loop.call(lambda: daemon.core.reset(conn.id))
    assert api.next_event(timeout=5) == {"event": "reset", "conn": conn.id}
    assert api.next_event(timeout=0) is None
    conn.close()  # the id is gone in the daemon already: quiet


def test_daemon_going_away_fails_pending_and_later_calls_promptly(
    daemon: Daemon, api: SpliceClient
) -> None:
    lst = api.listen(("192.0.2.1", 82))
    failed = threading.Event()
    errors: list[BaseException] = []

    def wait_for_accept() -> None:
        try:
            lst.accept()
        except BaseException as exc:
            errors.append(exc)
        failed.set()

    waiter = threading.Thread(target=wait_for_accept)
    waiter.start()
    # The accept request is in flight once the daemon has seen it; wait for that, no sleep.
    deadline = time.monotonic() + 5
    while not daemon.loop.call(lambda: any(lst.waiting for lst in daemon.core.listeners.values())):
        assert time.monotonic() < deadline
    started = time.monotonic()
    daemon.loop.call(daemon.server.close)
    assert failed.wait(timeout=2)
    waiter.join()
    assert time.monotonic() - started < 2
    assert len(errors) == 1 and isinstance(errors[0], DaemonGone)
    assert errors[0].code == "EDISCONNECTED"
    with pytest.raises(DaemonGone):
        api.stats()
    assert api.closed
    assert list(api.events()) == []  # no timeout given, yet it ends at detach


def test_attaching_to_a_missing_daemon_fails(sock_dir: str) -> None:
    with pytest.raises(FileNotFoundError):
        SpliceClient(os.path.join(sock_dir, "nobody-home.sock"))
