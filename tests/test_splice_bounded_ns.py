"""Bounded splice against the kernel stacks of the testbed: many splices per connection.

A proxy that keeps control over a persistent connection (what an HTTP/1.1
proxy needs, thesis 7.1's asymmetric splice) forwards each request itself,
reads the response head, and splices exactly the body; the daemon hands
both connections back after it.  The protocol here is the smallest one
that has the HTTP/1.1 problem: the client pipelines every request at once,
the server answers ``LEN n``, n bytes, then a trailer in the same write, so
a segment always crosses the limit.  If the splice relayed one byte too
many or too few, or leaked a pipelined request to the server, the client's
hashes or the trailers' order would show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from daemon.api.aio import AsyncConnection, AsyncSpliceClient
from testbed.net import Testbed
from tests.helpers import daemon_stats, run_py

pytestmark = pytest.mark.root

PROXY = ("198.51.100.1", 1190)
SERVER_PORT = 8090

SERVER = """
import random, socket, sys, threading
def serve(c):
    buf = b""
    k = 0
    while True:
        while b"\\n" not in buf:
            data = c.recv(65536)
            if not data:
                c.close()
                return
            buf += data
        line, buf = buf.split(b"\\n", 1)
        n = int(line.split()[1])
        body = random.Random(n).randbytes(n)
        c.sendall(b"LEN %d\\n" % n + body + b"END %d\\n" % k)
        k += 1
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = """
import hashlib, random, socket, sys, threading
host, port, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sizes = [int(x) for x in sys.argv[4].split(",")]
failures = []
def one(i):
    try:
        s = socket.create_connection((host, port), timeout=60)
        s.sendall(b"".join(b"GET %d\\n" % n for n in sizes))  # all pipelined at once
        f = s.makefile("rb")
        for k, n in enumerate(sizes):
            assert f.readline() == b"LEN %d\\n" % n
            body = f.read(n)
            want = random.Random(n).randbytes(n)
            assert hashlib.sha256(body).digest() == hashlib.sha256(want).digest(), (k, n)
            trailer = f.readline()
            assert trailer == b"END %d\\n" % k, (k, trailer)
        s.close()
    except Exception as exc:
        failures.append(f"conn {i}: {exc!r}")
threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print("ok" if not failures else "\\n".join(failures[:5]), len(failures))
"""


async def _line(c: AsyncConnection, buf: bytes) -> tuple[bytes | None, bytes]:
    while b"\n" not in buf:
        data = await c.recv(65536)
        if not data:
            return None, buf
        buf += data
    line, rest = buf.split(b"\n", 1)
    return line + b"\n", rest


async def _serve(api: AsyncSpliceClient, conn: AsyncConnection, server_addr: Any) -> int:
    """Forward each request, write the head and the body bytes we have, splice the rest."""
    server = await api.connect(server_addr)
    cbuf = sbuf = b""
    splices = 0
    try:
        while True:
            line, cbuf = await _line(conn, cbuf)  # pipelined requests stay with us
            if line is None:
                return splices
            await server.sendall(line)
            head, sbuf = await _line(server, sbuf)
            assert head is not None
            n = int(head.split()[1])
            have, sbuf = sbuf[:n], sbuf[n:]
            await conn.sendall(head + have)
            done = await api.splice_bounded(conn, server, server_limit=n - len(have))
            splices += 1
            assert done["client_extra"] == b""  # nothing may be relayed to the server
            sbuf += done["server_extra"]  # type: ignore[operator]
            trailer, sbuf = await _line(server, sbuf)  # the bytes past the limit
            assert trailer is not None
            await conn.sendall(trailer)
    finally:
        await conn.close()
        await server.close()


class BoundedProxy:
    """The proxy above, in a thread of its own with its own event loop."""

    def __init__(self, api_path: str, server_addr: tuple[str, int]) -> None:
        self.api_path = api_path
        self.server_addr = server_addr
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.errors: list[BaseException] = []
        self.splices = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        async with await AsyncSpliceClient.open(self.api_path) as api:
            lst = await api.listen(PROXY)
            self.ready.set()
            tasks: set[asyncio.Task[int]] = set()

            def done(task: asyncio.Task[int]) -> None:
                tasks.discard(task)
                if task.cancelled():
                    return
                if task.exception() is not None:
                    self.errors.append(task.exception())  # type: ignore[arg-type]
                else:
                    self.splices += task.result()

            try:
                while True:
                    conn = await lst.accept()
                    task = asyncio.create_task(_serve(api, conn, self.server_addr))
                    tasks.add(task)
                    task.add_done_callback(done)
            finally:
                for task in list(tasks):
                    task.cancel()

    def stop(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(10)


@pytest.fixture(scope="module")
def bed(spliced_tb: Testbed) -> Iterator[tuple[Testbed, BoundedProxy]]:
    server_host = spliced_tb.host("server")
    server = server_host.popen(
        [sys.executable, "-c", SERVER, server_host.addr, str(SERVER_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    proxy = BoundedProxy(str(spliced_tb.daemon_socket), (server_host.addr, SERVER_PORT))
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        proxy.thread.start()
        assert proxy.ready.wait(10)
        yield spliced_tb, proxy
    finally:
        with contextlib.suppress(Exception):
            proxy.stop()
        server.kill()
        server.wait()


def _run_clients(tb: Testbed, conns: int, sizes: list[int]) -> str:
    return run_py(
        tb.host("client"),
        CLIENT,
        *map(str, PROXY),
        str(conns),
        ",".join(map(str, sizes)),
        timeout=240,
    )


SIZES = [1024, 0, 100_000, 1, 3 << 20, 65536, 7]


def test_every_response_on_one_connection_is_spliced_to_the_byte(
    bed: tuple[Testbed, BoundedProxy],
) -> None:
    tb, proxy = bed
    before = daemon_stats(tb)["splice_counters"]
    out = _run_clients(tb, 1, SIZES)
    assert out.split() == ["ok", "0"], out
    after = daemon_stats(tb)
    counters = after["splice_counters"]
    assert counters["bounded"] - before["bounded"] == len(SIZES)
    assert counters["handed_back"] - before["handed_back"] == len(SIZES)
    # Bounded splices stay in the daemon, even with the fast path running.
    assert counters["fast_path_installed"] == before["fast_path_installed"]
    assert not proxy.errors, proxy.errors
    assert not [s for s in after["splices"] if s["bounded"]]


def test_a_hundred_connections_at_once_each_splice_every_response(
    bed: tuple[Testbed, BoundedProxy],
) -> None:
    tb, proxy = bed
    before = daemon_stats(tb)["splice_counters"]
    sizes = [1500, 70_000, 0, 300_000]
    for _ in range(2):
        out = _run_clients(tb, 100, sizes)
        assert out.split() == ["ok", "0"], out
    counters = daemon_stats(tb)["splice_counters"]
    assert counters["handed_back"] - before["handed_back"] == 2 * 100 * len(sizes)
    assert not proxy.errors, proxy.errors
