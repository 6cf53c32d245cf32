"""An idle splice in the kernel fast path keeps no relay in the daemon: it is dormant.

Once both TCBs fell silent, the proxy let go of both fds and both
directions are in the kernel's map, the daemon drops the splice's relay:
the two map entries hold everything it needs (daemon/io/splicer.py
``_sleep``).  A segment the kernel punts wakes it with a relay rebuilt from
the entries; a segment that does not move the splice (here: packets with
IP options, which the program never handles) lets it sleep again, a FIN
keeps it awake through the teardown.  Checked against real kernel peers,
by content: the sink answers the SHA-256 of what it read.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from daemon.fastpath import libbpf
from daemon.fastpath.layout import encode_key
from daemon.fastpath.loader import flows_map_of, read_flows
from testbed.net import Testbed
from tests.conftest import unique_prefix
from tests.helpers import daemon_stats

pytestmark = pytest.mark.root

# Through the spliced SOCKS5 to the raw sink: a block, wait; the same block
# with IP options on every segment (each one punted), wait; half-close and
# read the sink's digest.
CLIENT = """
import socket, sys
from clients.socks5 import socks5_connect
proxy, pport, sink, sport, size = sys.argv[1:]
block = bytes(range(256)) * (int(size) // 256)
s = socket.create_connection((proxy, int(pport)), timeout=20)
socks5_connect(s, sink, int(sport))
s.sendall(block)
print("sent", flush=True)
sys.stdin.readline()
# NOP, NOP, NOP, end of options: a 24-byte IP header on every segment.
s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\\x01\\x01\\x01\\x00")
s.sendall(block)
print("sent", flush=True)
sys.stdin.readline()
s.shutdown(socket.SHUT_WR)
answer = b""
while not answer.endswith(b"\\n"):
    chunk = s.recv(100)
    if not chunk:
        break
    answer += chunk
print(answer.decode().strip(), flush=True)
"""


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    bed = Testbed(unique_prefix(), msl=1.0, fastpath="on")
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


def _socks_client(tb: Testbed, script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` in the client host, through the spliced SOCKS5 to the sink; lines both ways."""
    argv = [sys.executable, "-c", script, *map(str, tb.spliced_socks), *map(str, tb.sink), *args]
    return tb.host("client").popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _wait(tb: Testbed, cond: Callable[[dict[str, Any]], bool], seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        st = daemon_stats(tb)
        if cond(st):
            return st
        if time.monotonic() > deadline:
            rows = st["splices"]
            fast = st.get("fast_path", {}).get("counters")
            raise AssertionError(
                f"not reached in {seconds} s: {st['splice_counters']}; splices {rows}; fast {fast}"
            )
        time.sleep(0.1)


def test_an_idle_splice_sleeps_wakes_for_punted_segments_and_ends_intact(tb: Testbed) -> None:
    size = 256 << 10
    before = daemon_stats(tb)["splice_counters"]
    proc = _socks_client(tb, CLIENT, str(size))
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "sent"
        # Idle and wholly in the kernel: no relay left, its stats row from the map.
        # "sent" means in the client's socket buffer: the splice may go dormant
        # before the last of it has crossed, so wait for the bytes too.  The
        # row sums the relay's share and the kernel's (retransmissions count).
        st = _wait(
            tb,
            lambda s: (
                s["splice_counters"]["dormant"] == 1
                and len(s["splices"]) == 1
                and s["splices"][0]["bytes_c2s"] >= size
            ),
            10.0,
        )
        (row,) = st["splices"]
        assert row["dormant"] and row["client_state"] == row["server_state"] == "SPLICED"
        first = row["bytes_c2s"]

        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "sent"
        punted = before["woken"] + 1
        st = _wait(
            tb,
            lambda s: (
                s["splice_counters"]["woken"] >= punted
                and s["splice_counters"]["dormant"] == 1
                and len(s["splices"]) == 1
                and s["splices"][0]["bytes_c2s"] >= first + size
            ),
            10.0,
        )
        c = st["splice_counters"]
        assert c["slept"] - before["slept"] == c["woken"] - before["woken"] + 1
        # Every client segment was punted (its IP options), but the splice
        # stayed awake while they came: not a wake and a sleep per packet.
        assert c["woken"] - before["woken"] <= 2, c
        assert st["fast_path"]["counters"]["punt_ip_options_or_fragment"] > 0
        (row,) = st["splices"]
        assert row["bytes_c2s"] >= first + size  # what the woken relays relayed is kept

        proc.stdin.write("go\n")
        proc.stdin.flush()
        want = hashlib.sha256(2 * (bytes(range(256)) * (size // 256))).hexdigest()
        assert proc.stdout.readline().strip() == want
        assert proc.wait(timeout=10) == 0
        # The FINs woke it for good: TIMEWAIT (2 MSL = 2 s), then forgotten.
        st = _wait(tb, lambda s: not s["splices"] and s["splice_counters"]["dormant"] == 0, 10.0)
        assert st["splice_counters"]["torn_down"] > before["torn_down"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Sends a block, waits, half-closes and reports what comes back.
HALF_CLOSER = """
import socket, sys
from clients.socks5 import socks5_connect
proxy, pport, sink, sport = sys.argv[1:]
s = socket.create_connection((proxy, int(pport)), timeout=10)
socks5_connect(s, sink, int(sport))
s.sendall(bytes(65536))
print("sent", flush=True)
sys.stdin.readline()
s.shutdown(socket.SHUT_WR)
try:
    print("answer", s.recv(100), flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""


def _prog_id(tb: Testbed) -> int:
    _ns, dev = tb.link("client-proxy").endpoint("proxy")
    out = tb.host("proxy").cmd(["tc", "filter", "show", "dev", dev, "ingress"], check=True)
    match = re.search(r"splice_ingress:\[(\d+)\]", out.stdout)
    assert match, out.stdout
    return int(match.group(1))


def test_a_dormant_splice_whose_map_entry_vanished_is_reset_not_mistranslated(
    tb: Testbed,
) -> None:
    """Only the daemon writes its map; if an entry goes anyway, the splice ends cleanly.

    The server side's entry is deleted behind the daemon's back (as root,
    by program id).  The client's FIN is punted and wakes the splice, which
    cannot be rebuilt from one entry: the daemon forgets it, removes the
    other entry, and the FIN meets an unknown 4-tuple: a RST (RFC 9293
    3.10.7.1), and the daemon keeps serving.
    """
    proc = _socks_client(tb, HALF_CLOSER)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "sent"
        _wait(tb, lambda s: s["splice_counters"]["dormant"] == 1, 5.0)
        fd = flows_map_of(_prog_id(tb))
        try:
            sink = socket.inet_aton(tb.sink[0])
            server_keys = [k for k, _ in read_flows(fd) if k[0] == sink]
            assert len(server_keys) == 1, server_keys
            assert libbpf.lib().map_delete_elem(fd, ctypes.byref(encode_key(server_keys[0]))) == 0
        finally:
            os.close(fd)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "reset"
        st = _wait(tb, lambda s: s["splice_counters"]["dormant"] == 0, 5.0)
        assert st["splices"] == []
        log = (tb.run_dir / "daemon.log").read_text()
        assert "has no sound map entries; forgotten" in log
        fd = flows_map_of(_prog_id(tb))
        try:
            assert read_flows(fd) == []  # the direction left alone was removed too
        finally:
            os.close(fd)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# A block, wait, then the half-close whose FIN must wake the splice.
SEND_THEN_CLOSE = """
import socket, sys
from clients.socks5 import socks5_connect
proxy, pport, sink, sport, size = sys.argv[1:]
block = bytes(range(256)) * (int(size) // 256)
s = socket.create_connection((proxy, int(pport)), timeout=20)
socks5_connect(s, sink, int(sport))
s.sendall(block)
print("sent", flush=True)
sys.stdin.readline()
s.shutdown(socket.SHUT_WR)
answer = b""
while not answer.endswith(b"\\n"):
    chunk = s.recv(100)
    if not chunk:
        break
    answer += chunk
print(answer.decode().strip(), flush=True)
"""


@pytest.mark.parametrize(("client", "server"), [(6, 6), (6, 4), (4, 6)])
def test_an_ipv6_splice_sleeps_and_its_fin_wakes_it(tb: Testbed, client: int, server: int) -> None:
    """Dormancy in IPv6 and across families: the map entries hold the real addresses (the
    relay's translator has placeholders), and a punted IPv6 segment finds its splice."""
    size = 256 << 10
    socks = tb.spliced_socks6 if client == 6 else tb.spliced_socks
    sink = tb.sink6 if server == 6 else tb.sink
    before = daemon_stats(tb)["splice_counters"]
    argv = [sys.executable, "-c", SEND_THEN_CLOSE, *map(str, socks), *map(str, sink), str(size)]
    proc = tb.host("client").popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "sent"
        st = _wait(
            tb,
            lambda s: (
                s["splice_counters"]["dormant"] == 1
                and len(s["splices"]) == 1
                and s["splices"][0]["bytes_c2s"] >= size
            ),
            10.0,
        )
        assert st["splices"][0]["dormant"]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        want = hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
        assert proc.stdout.readline().strip() == want
        assert proc.wait(timeout=10) == 0
        st = _wait(tb, lambda s: not s["splices"] and s["splice_counters"]["dormant"] == 0, 10.0)
        c = st["splice_counters"]
        assert c["woken"] > before["woken"] and c["torn_down"] > before["torn_down"], c
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
