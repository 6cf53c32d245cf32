"""The daemon's TCP endpoint over IPv6 (RFC 8200), against Linux in the client and server.

The daemon terminates 2001:db8:d::/64 beside its IPv4 prefix: a listener
there accepts Linux clients (rounds of 100 concurrent, content-checked),
and a connect from it reaches the origin's IPv6 address.  Its SYN-ACK offers
MSS 1440 (1500 - 40 - 20).  Splices of IPv6 connections:
tests/test_splice_ipv6.py.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.net import Testbed
from tests.helpers import curl_sha256, loadgen, pattern_sha256, run_py

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
    synack_mss = _synack_mss(pcap, PORT)
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


def _synack_mss(pcap: Path, port: int) -> list[int]:
    """MSS options of IPv6 SYN-ACKs from ``port`` in an Ethernet pcap."""
    data = pcap.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 14 + 40 + 24 or frame[12:14] != b"\x86\xdd" or frame[20] != 6:
            continue
        tcp = frame[54:]
        sport = struct.unpack("!H", tcp[:2])[0]
        if sport != port or tcp[13] & 0x12 != 0x12:
            continue
        opts, i = tcp[20 : (tcp[12] >> 4) * 4], 0
        while i < len(opts) and opts[i] != 0:
            if opts[i] == 1:
                i += 1
                continue
            if opts[i] == 2:
                out.append(struct.unpack("!H", opts[i + 2 : i + 4])[0])
            i += max(opts[i + 1], 2)
    return out


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
    ps = tb.link("proxy-server")
    proxy = tb.host("proxy").popen(
        [
            sys.executable,
            "-c",
            """
import hashlib, os, socket, sys
from daemon.api.client import SpliceClient
with SpliceClient(sys.argv[1]) as api:
    conn = api.connect((sys.argv[2], int(sys.argv[3])), timeout=5)
    print("mss", api.stats(conn.id)["mss"], flush=True)
    sys.stdin.readline()  # the test lowers the link's MTU now
    data = os.urandom(4 << 20)
    conn.settimeout(30)
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := conn.recv(1024):
        answer += chunk
    st = api.stats(conn.id)
    ok = answer.strip().decode() == hashlib.sha256(data).hexdigest()
    print("ok" if ok else "corrupt", st["mss"], st["pmtu_updates"], flush=True)
""",
            str(tb.daemon_socket),
            *map(str, tb.sink6),
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdin is not None
        kind, mss = proxy.stdout.readline().split()
        assert kind == "mss" and int(mss) > 1280 - 60
        ps.set_mtu(1280)
        proxy.stdin.write("go\n")
        proxy.stdin.flush()
        verdict, mss, updates = proxy.stdout.readline().split()
        assert verdict == "ok"
        assert int(mss) <= 1280 - 60 and int(updates) >= 1
        assert proxy.wait(timeout=20) == 0
    finally:
        ps.set_mtu(1500)
        proxy.kill()
        proxy.wait()


def hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("size", [1024, 1 << 20, 64 << 20])
def test_curl_over_ipv6_through_the_endpoint_socks5(tb: Testbed, size: int) -> None:
    """Both TCP connections the daemon's, over IPv6 (curl, a Linux origin), content-checked."""
    url = f"http://{hostport(tb.origin6)}/bytes/{size}"
    rc, digest = curl_sha256(tb.host("client"), url, "-6", "--socks5", hostport(tb.endpoint_socks6))
    assert rc == 0 and digest == pattern_sha256(size)


@pytest.mark.parametrize(("client_family", "server_family"), [(4, 6), (6, 4)])
def test_the_endpoint_socks5_joins_the_families(
    tb: Testbed, client_family: int, server_family: int
) -> None:
    size = 8 << 20
    origin = tb.origin6 if server_family == 6 else tb.origin
    socks = tb.endpoint_socks6 if client_family == 6 else tb.endpoint_socks
    url = f"http://{hostport(origin)}/bytes/{size}"
    rc, digest = curl_sha256(tb.host("client"), url, "--socks5", hostport(socks))
    assert rc == 0 and digest == pattern_sha256(size)


def test_rounds_of_100_concurrent_ipv6_transfers_through_the_endpoint_socks5(
    tb: Testbed,
) -> None:
    for _ in range(3):
        results = loadgen(
            tb.host("client"),
            "--server",
            hostport(tb.origin6),
            "--size",
            "64K",
            "--socks5",
            hostport(tb.endpoint_socks6),
            "--concurrency",
            "100",
        )
        failed = [r for r in results if not r["ok"]]
        assert len(results) == 100 and failed == [], failed[:3]
