"""The daemon's TCP endpoint over IPv6 (RFC 8200), against Linux in the client and server.

The daemon terminates 2001:db8:d::/64 beside its IPv4 prefix: a listener
there accepts Linux clients (rounds of 100 concurrent, content-checked),
and a connect from it reaches the origin's IPv6 address.  Its SYN-ACK offers
MSS 1440 (1500 - 40 - 20).  Splices of IPv6 connections:
tests/test_splice_ipv6.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from servers.address import format_host_port
from testbed.net import Testbed
from testbed.pcap import tcp_frames
from tests.helpers import curl_sha256, loadgen, pattern_sha256, run_py
from tests.test_daemon_endpoint import upload_over_shrinking_link

pytestmark = pytest.mark.root

PORT = 8096

SERVER = """
import hashlib, json, sys, threading
from daemon.api.client import SpliceClient
from servers.pattern import pattern_bytes
sock, addr, port, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with SpliceClient(sock) as api:
    lst = api.listen((addr, port), backlog=256)
    print("ready", flush=True)
    def serve(conn):
        got = b""
        while not got.endswith(b"\\n"):
            chunk = conn.recv(64)
            if not chunk:
                return
            got += chunk
        size = int(got)
        conn.sendall(pattern_bytes(1, size))
        conn.close()
    threads = []
    first = None
    for _ in range(rounds):
        conn = lst.accept(timeout=60)
        if first is None:
            first = api.stats(conn)
        t = threading.Thread(target=serve, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(60)
    print(json.dumps(first), flush=True)
"""

CLIENTS = """
import hashlib, socket, sys, threading
addr, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
digests, errors = [], []
def one():
    try:
        s = socket.create_connection((addr, port), timeout=30)
        s.sendall(b"%d\\n" % size)
        h, got = hashlib.sha256(), 0
        while chunk := s.recv(1 << 16):
            h.update(chunk)
            got += len(chunk)
        s.close()
        digests.append((got, h.hexdigest()))
    except OSError as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=one) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
print(len(digests), len(errors), len(set(digests)), *set(digests), *errors[:3])
"""


def test_linux_clients_over_ipv6_reach_a_daemon_listener(tb: Testbed, tmp_path: Path) -> None:
    addr, rounds, size, n = tb.splice_service6, 3, 64 << 10, 100
    pcap = tmp_path / "cp.pcap"
    server = tb.host("proxy").popen(
        [sys.executable, "-c", SERVER, str(tb.daemon_socket), addr, str(PORT), str(rounds * n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        with tb.link("client-proxy").capture(pcap, snaplen=128, bpf=f"ip6 and tcp port {PORT}"):
            for _ in range(rounds):
                out = run_py(tb.host("client"), CLIENTS, addr, str(PORT), str(n), str(size))
                done, failed, distinct, *rest = out.split()
                assert (done, failed, distinct) == (str(n), "0", "1"), out
                assert rest[0] == f"({size}," and rest[1] == f"'{pattern_sha256(size)}')"
        stats = json.loads(server.stdout.readline())
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert stats["local"] == [addr, PORT]
    assert stats["peer"][0] == tb.host("client").addr6
    assert stats["mss"] <= 1440 - 12  # IPv6: 20 bytes more header than IPv4 (and TS)
    synack_mss = [
        f.mss
        for f in tcp_frames(pcap)
        if f.version == 6 and f.sport == PORT and f.flags & 0x12 == 0x12
    ]
    assert synack_mss and set(synack_mss) == {1440}


def test_a_daemon_connect_reaches_the_origin_over_ipv6(tb: Testbed) -> None:
    host, port = tb.origin6
    out = run_py(
        tb.host("proxy"),
        """
        import hashlib, sys
        from daemon.api.client import SpliceClient
        with SpliceClient(sys.argv[1]) as api:
            conn = api.connect((sys.argv[2], int(sys.argv[3])), timeout=5)
            conn.sendall(b"GET /bytes/8388608 HTTP/1.0\\r\\n\\r\\n")
            data = b""
            while chunk := conn.recv(1 << 16):
                data += chunk
            body = data.split(b"\\r\\n\\r\\n", 1)[1]
            st = api.stats(conn)
            print(len(body), hashlib.sha256(body).hexdigest(), st["local"][0])
        """,
        str(tb.daemon_socket),
        host,
        str(port),
    )
    size, digest, local = out.split()
    assert int(size) == 8 << 20 and digest == pattern_sha256(8 << 20)
    assert local == "2001:db8:d::2"  # --source6


def test_an_unrouted_ipv6_destination_fails_the_connect_at_once(tb: Testbed) -> None:
    """The proxy host's kernel answers with ICMPv6 "no route" (RFC 4443 3.1), quoting the
    SYN: ENETUNREACH, not a connect timeout."""
    out = run_py(
        tb.host("proxy"),
        """
        import sys, time
        from daemon.api.client import SpliceClient
        from daemon.api.replies import SpliceError
        with SpliceClient(sys.argv[1]) as api:
            t0 = time.monotonic()
            try:
                api.connect(("2001:db8:ffff::1", 80), timeout=20)
                print("connected")
            except SpliceError as exc:
                print(exc.code, round(time.monotonic() - t0, 1))
        """,
        str(tb.daemon_socket),
    )
    code, seconds = out.split()
    assert code == "ENETUNREACH" and float(seconds) < 10


def test_an_ipv6_link_shrinking_to_1280_lowers_the_segment_size(tb: Testbed) -> None:
    """RFC 8201: Packet Too Big from the proxy host's forwarding; the upload then fits."""
    before, verdict, after, updates = upload_over_shrinking_link(tb, tb.sink6, 1280)
    assert before > 1280 - 60 and verdict == "ok"
    assert after <= 1280 - 60 and updates >= 1


@pytest.mark.parametrize("size", [1024, 1 << 20, 64 << 20])
def test_curl_over_ipv6_through_the_endpoint_socks5(tb: Testbed, size: int) -> None:
    """Both TCP connections the daemon's, over IPv6 (curl, a Linux origin), content-checked."""
    url = f"http://{format_host_port(*tb.origin6)}/bytes/{size}"
    rc, digest = curl_sha256(
        tb.host("client"), url, "-6", "--socks5", format_host_port(*tb.endpoint_socks6)
    )
    assert rc == 0 and digest == pattern_sha256(size)


@pytest.mark.parametrize(("client_family", "server_family"), [(4, 6), (6, 4)])
def test_the_endpoint_socks5_joins_the_families(
    tb: Testbed, client_family: int, server_family: int
) -> None:
    size = 8 << 20
    origin = tb.origin6 if server_family == 6 else tb.origin
    socks = tb.endpoint_socks6 if client_family == 6 else tb.endpoint_socks
    url = f"http://{format_host_port(*origin)}/bytes/{size}"
    rc, digest = curl_sha256(tb.host("client"), url, "--socks5", format_host_port(*socks))
    assert rc == 0 and digest == pattern_sha256(size)


def test_rounds_of_100_concurrent_ipv6_transfers_through_the_endpoint_socks5(
    tb: Testbed,
) -> None:
    for _ in range(3):
        results = loadgen(
            tb.host("client"),
            "--server",
            format_host_port(*tb.origin6),
            "--size",
            "64K",
            "--socks5",
            format_host_port(*tb.endpoint_socks6),
            "--concurrency",
            "100",
        )
        failed = [r for r in results if not r["ok"]]
        assert len(results) == 100 and failed == [], failed[:3]
