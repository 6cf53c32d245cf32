"""Path MTU discovery for spliced flows (RFC 1191), against Linux peers.

A link shrinks to 1200 bytes in the middle of a spliced transfer that
negotiated MSS 1460.  The proxy host's kernel answers the daemon's relayed
segments with "fragmentation needed"; the daemon sends that on to the peer
whose segment it was (daemon/splice/relay.py ``frag_needed``), quoting the
segment in the peer's own connection.  Without it the transfer is a black
hole: the peer keeps sending 1500-byte packets that no one can forward.
With the kernel fast path, the program hands such packets to the daemon
instead of redirecting them (``punt_mtu``): redirected, they would vanish
without an ICMP on a real link.  (veth lets GSO packets past its MTU, so
here they would arrive anyway; what the tests check is that the peer was
told: the relayed ICMP, and the client's own segment size after it.)
Both directions, content-checked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from testbed.net import Testbed
from tests.helpers import daemon_stats, pattern_sha256

pytestmark = pytest.mark.root

SMALL_MTU = 1200

UPLOAD = """
import hashlib, os, socket, struct, sys
from clients.socks5 import socks5_connect
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
socks5_connect(s, sys.argv[3], int(sys.argv[4]))
data = os.urandom(8 << 20)
s.sendall(data[: 1 << 20])
print("spliced", struct.unpack_from("I", s.getsockopt(6, 11, 104), 16)[0], flush=True)
sys.stdin.readline()  # the test shrinks the server's link now
s.sendall(data[1 << 20 :])
s.shutdown(socket.SHUT_WR)
answer = b""
while chunk := s.recv(1024):
    answer += chunk
mss = struct.unpack_from("I", s.getsockopt(6, 11, 104), 16)[0]  # TCP_INFO tcpi_snd_mss
ok = answer.strip().decode() == hashlib.sha256(data).hexdigest()
print("ok" if ok else "corrupt", mss, flush=True)
"""

DOWNLOAD = """
import hashlib, socket, sys
from clients.socks5 import socks5_connect
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
socks5_connect(s, sys.argv[3], int(sys.argv[4]))
size = int(sys.argv[5])
s.sendall(f"GET /bytes/{size} HTTP/1.0\\r\\n\\r\\n".encode())
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += s.recv(1)
h, got = hashlib.sha256(), 0
def take(n):
    global got
    while got < n:
        chunk = s.recv(min(1 << 16, n - got))
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
take(1 << 20)
print("started", flush=True)
sys.stdin.readline()  # the test shrinks the client's link now
take(size)
print(got, h.hexdigest(), flush=True)
"""


def run_shrinking(
    tb: Testbed, link: str, code: str, args: list[str], ready: str, mtu: int = SMALL_MTU
) -> tuple[list[str], dict[str, int]]:
    """Run ``code`` in the client; shrink ``link`` once it prints ``ready``; its last line."""
    for host in ("client", "server"):
        # The path MTUs an earlier test taught the peers (route exceptions,
        # kept 10 minutes) would make them offer a small MSS from the start.
        for family in ("-4", "-6"):
            tb.host(host).cmd(["ip", family, "route", "flush", "cache"], check=True)
    before = daemon_stats(tb)
    proc = tb.host("client").popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    shrunk = tb.link(link)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline().split()
        assert first and first[0] == ready, first
        shrunk.set_mtu(mtu)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        last = proc.stdout.readline().split()
        assert proc.wait(timeout=60) == 0
    finally:
        shrunk.set_mtu(1500)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = daemon_stats(tb)
    moved = {
        k: after["counters"][k] - before["counters"].get(k, 0)
        for k in ("icmp_frag_needed_relayed", "icmp_unreachable")
    }
    fp_after = after.get("fast_path", {}).get("counters", {})
    fp_before = before.get("fast_path", {}).get("counters", {})
    moved["punt_mtu"] = fp_after.get("punt_mtu", 0) - fp_before.get("punt_mtu", 0)
    return first + last, moved


def test_an_upload_whose_server_link_shrinks_is_told_and_arrives_intact(
    spliced_tb: Testbed,
) -> None:
    tb = spliced_tb
    args = [*map(str, tb.spliced_socks), *map(str, tb.sink)]
    out, moved = run_shrinking(tb, "proxy-server", UPLOAD, args, "spliced")
    _, mss_before, verdict, mss_after = out
    assert int(mss_before) > SMALL_MTU - 40
    assert verdict == "ok"
    assert int(mss_after) <= SMALL_MTU - 40  # the client itself lowered its segment size
    assert moved["icmp_frag_needed_relayed"] >= 1
    if tb.fastpath == "on":
        assert moved["punt_mtu"] >= 1


def test_a_download_whose_client_link_shrinks_is_told_and_arrives_intact(
    spliced_tb: Testbed,
) -> None:
    tb = spliced_tb
    size = 16 << 20
    args = [*map(str, tb.spliced_socks), *map(str, tb.origin), str(size)]
    out, moved = run_shrinking(tb, "client-proxy", DOWNLOAD, args, "started")
    _, got, digest = out
    assert int(got) == size and digest == pattern_sha256(size)
    assert moved["icmp_frag_needed_relayed"] >= 1
    if tb.fastpath == "on":
        assert moved["punt_mtu"] >= 1
