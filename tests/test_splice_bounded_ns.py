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
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.api.aio import AsyncConnection, AsyncSpliceClient
from testbed.net import Testbed
from tests.helpers import daemon_stats, run_py
from tests.test_splice import _check_link, _opts, _read_pcap

pytestmark = pytest.mark.root

PROXY = ("198.51.100.1", 1190)
SERVER_PORT = 8090
TAPS_CHECKED = [0]  # responses whose tap the proxy compared with the body

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
suffix = sys.argv[5].encode() if len(sys.argv) > 5 else b""
failures = []
def one(i):
    where = "?"
    try:
        s = socket.create_connection((host, port), timeout=60)
        where = s.getsockname()
        s.sendall(b"".join(b"GET %d%s\\n" % (n, suffix) for n in sizes))  # all pipelined
        f = s.makefile("rb")
        for k, n in enumerate(sizes):
            head = f.readline()
            assert head == b"LEN %d\\n" % n, ("head", k, head)
            body = f.read(n)
            want = random.Random(n).randbytes(n)
            assert hashlib.sha256(body).digest() == hashlib.sha256(want).digest(), (k, n)
            trailer = f.readline()
            assert trailer == b"END %d\\n" % k, (k, trailer)
        s.close()
    except Exception as exc:
        failures.append(f"conn {i} {where}: {exc!r}")
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
    # A small receive window: the bodies wait at the server and are relayed
    # (by the kernel, with the fast path), rather than crossing at the freeze.
    server = await api.connect(server_addr, rcvbuf=16384)
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
            chunks: list[bytes] = []
            tap = chunks.append if b"tap" in line else None
            done = await api.splice_bounded(conn, server, server_limit=n - len(have), on_tap=tap)
            splices += 1
            assert done["client_extra"] == b""  # nothing may be relayed to the server
            sbuf += done["server_extra"]  # type: ignore[operator]
            if tap is not None:
                # The tap saw exactly the body bytes the splice carried.
                assert done["tap_overflow"] is False, done
                assert have + b"".join(chunks) == random.Random(n).randbytes(n), (n, done)
                TAPS_CHECKED[0] += 1
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


def _run_clients(tb: Testbed, conns: int, sizes: list[int], suffix: str = "") -> str:
    return run_py(
        tb.host("client"),
        CLIENT,
        *map(str, PROXY),
        str(conns),
        ",".join(map(str, sizes)),
        suffix,
        timeout=240,
    )


SIZES = [1024, 0, 100_000, 1, 3 << 20, 65536, 7]


def test_every_response_on_one_connection_is_spliced_to_the_byte(
    bed: tuple[Testbed, BoundedProxy],
) -> None:
    tb, proxy = bed
    stats_before = daemon_stats(tb)
    before, before_fp = stats_before["splice_counters"], stats_before["fast_path"]
    out = _run_clients(tb, 1, SIZES)
    assert out.split() == ["ok", "0"], out
    after = daemon_stats(tb)
    counters = after["splice_counters"]
    assert counters["bounded"] - before["bounded"] == len(SIZES)
    assert counters["handed_back"] - before["handed_back"] == len(SIZES)
    if tb.fastpath == "on":
        # The kernel carried the bodies up to each limit; the daemon cut
        # the segment that reached it and saw the ACK of its last byte.
        assert counters["fast_path_installed"] > before["fast_path_installed"]
        fp, fp_before = after["fast_path"]["counters"], before_fp["counters"]
        assert fp["punt_limit"] > fp_before["punt_limit"]
        # Most of the 3 MB body went through the kernel, not the daemon.
        assert fp["redirected_bytes"] - fp_before["redirected_bytes"] > 2 << 20
    else:
        assert not after["fast_path"]["running"]
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


def test_the_tap_carries_each_spliced_body_exactly(bed: tuple[Testbed, BoundedProxy]) -> None:
    tb, proxy = bed
    before_taps = TAPS_CHECKED[0]
    out = _run_clients(tb, 4, SIZES, " tap")
    assert out.split() == ["ok", "0"], out
    assert not proxy.errors, proxy.errors
    assert TAPS_CHECKED[0] - before_taps == 4 * len(SIZES)
    counters = daemon_stats(tb)["splice_counters"]
    assert counters["tapped"] >= 4 * len(SIZES)


@pytest.mark.parametrize("link", ["client-proxy", "proxy-server"])
@pytest.mark.parametrize("impairment", ["loss=2%", "delay=5ms reorder=25%", "duplicate=5%"])
def test_impaired_links_at_the_boundary_lose_no_byte_and_leak_none(
    bed: tuple[Testbed, BoundedProxy], link: str, impairment: str
) -> None:
    tb, proxy = bed
    shaped = tb.link(link)
    try:
        shaped.shape(impairment + " seed=5")
        out = _run_clients(tb, 4, [1024, 0, 200_000, 1, 1 << 20, 7], " tap")
        # The impairment process writes its counters about once a second.
        deadline = time.monotonic() + 5
        hit = 0
        while not hit and time.monotonic() < deadline:
            counters = shaped.shape_status()[1]
            hit = sum(
                v
                for d in ("a_to_b", "b_to_a")
                for k, v in counters.get(d, {}).items()
                if k != "seen"
            )
            time.sleep(0.2)
    finally:
        shaped.clear()
    assert out.split() == ["ok", "0"], out
    assert not proxy.errors, proxy.errors
    assert hit > 0, "the impairment touched no packet"


def _stream_errors(packets: list[Any], port: int) -> list[str]:
    """Each side's bytes on one connection tile its sequence space; its TSvals never go back.

    Across splices and hand-backs the peer must see one continuous stream
    (no gap, whatever was relayed and whatever the daemon's TCB sent) and,
    from the daemon's side, a TS clock that only moves forward (RFC 7323
    5.3: PAWS drops the rest).
    """
    flow = [p for p in packets if port in (p[1], p[3])]
    errors: list[str] = []
    for side in {(p[0], p[1]) for p in flow}:
        mine = [p for p in flow if (p[0], p[1]) == side]
        syn = next(p for p in mine if p[4] & 0x02)
        isn = syn[5]
        covered = 0
        ranges = sorted(((p[5] - isn - 1) % (1 << 32), p[8]) for p in mine if p[8])
        for start, length in ranges:
            if start > covered:
                errors.append(f"{side}: bytes {covered}..{start} never sent")
            covered = max(covered, start + length)
        if side[0][:3] != bytes([198, 51, 100]):
            # A kernel peer's TSvals are its own business (Linux stamps a
            # segment when it builds it, so two may leave out of order);
            # the daemon's are the ones the splice and the hand-back move.
            continue
        last = None
        for p in mine:
            o = _opts(p[7])
            if 8 in o and len(o[8]) == 8:
                tsval = struct.unpack("!I", o[8][:4])[0]
                back = (last - tsval) % (1 << 32) if last is not None else 0
                # One tick back on a pure ACK is the peer's clock, not ours:
                # its ACKs relayed in the order they reached the proxy, which
                # the wire had changed (seen: the client's ACK with TSval T
                # behind its ACK with T+1 on the client link; Linux's PAWS
                # lets one tick pass, TCP_PAWS_WINDOW).  Data one tick back
                # is the relay reordering a stream (Splicer.run_installs);
                # more than one tick, a clock that went back.
                if 0 < back < 1 << 31 and (back > 1 or p[8]):
                    errors.append(f"{side}: TSval {tsval} after {last}")
                last = tsval
    return errors[:10]


def test_captures_show_one_continuous_connection_per_link(
    bed: tuple[Testbed, BoundedProxy], tmp_path: Path
) -> None:
    tb, _ = bed
    cp_pcap, ps_pcap = tmp_path / "cp.pcap", tmp_path / "ps.pcap"
    shaped = tb.link("client-proxy")
    try:
        shaped.shape("loss=1% seed=3")
        with (
            tb.link("client-proxy").capture(cp_pcap, snaplen=128),
            tb.link("proxy-server").capture(ps_pcap, snaplen=128),
        ):
            out = _run_clients(tb, 1, [500_000, 10, 300_000, 0, 2_000_000], " tap")
    finally:
        shaped.clear()
    assert out.split() == ["ok", "0"], out
    cp, ps = _read_pcap(cp_pcap), _read_pcap(ps_pcap)
    (client_port,) = {p[1] for p in cp if p[3] == PROXY[1] and p[4] & 0x12 == 0x02}
    (server_port,) = {p[1] for p in ps if p[3] == SERVER_PORT and p[4] & 0x12 == 0x02}
    for packets, port in ((cp, client_port), (ps, server_port)):
        assert _check_link(packets, port) == []
        assert _stream_errors(packets, port) == []
