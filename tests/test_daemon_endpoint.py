"""The splice daemon as a TCP endpoint, against the kernel stacks of the testbed.

A SOCKS5 proxy whose client-side and server-side TCP connections are both
terminated by the daemon (on its TUN in the proxy namespace) and copied in
user space (issue 3's proof, before any splicing): curl in the client
namespace, the origin's kernel TCP in the server namespace.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.net import Testbed
from tests.helpers import (
    connect_request,
    curl_sha256,
    daemon_stats,
    half_close_through_socks,
    loadgen,
    pattern_sha256,
    run_py,
    same_port_twice,
    socks_reply_code,
)

pytestmark = pytest.mark.root


def socks_url(tb: Testbed, size: int) -> tuple[str, str, str]:
    ip, port = tb.origin
    es = tb.endpoint_socks
    return f"http://{ip}:{port}/bytes/{size}", "--socks5", f"{es[0]}:{es[1]}"


@pytest.mark.parametrize("size", [1024, 1 << 20, 64 << 20])
def test_curl_download_through_the_daemon_endpoint_is_intact(tb: Testbed, size: int) -> None:
    url, *proxy = socks_url(tb, size)
    rc, digest = curl_sha256(tb.host("client"), url, *proxy)
    assert rc == 0 and digest == pattern_sha256(size)


@pytest.mark.parametrize("size", ["1K", "1M", "64M"])
def test_upload_through_the_daemon_endpoint_is_checked_by_the_sink(tb: Testbed, size: str) -> None:
    ip, port = tb.origin
    es = tb.endpoint_socks
    results = loadgen(
        tb.host("client"),
        "--server",
        f"{ip}:{port}",
        "--size",
        size,
        "--socks5",
        f"{es[0]}:{es[1]}",
        "--upload",
        "--timeout",
        "120",
    )
    assert len(results) == 1 and results[0]["ok"], results


def test_half_close_through_the_daemon_endpoint(tb: Testbed) -> None:
    assert half_close_through_socks(tb.host("client"), tb.endpoint_socks, tb.sink, 3 << 20)


def test_connect_outcomes_reach_the_socks_client(tb: Testbed) -> None:
    client, es = tb.host("client"), tb.endpoint_socks
    server_ip = tb.origin[0]
    # The server's kernel answers RST: the daemon's connect is refused.
    assert socks_reply_code(client, es, connect_request(server_ip, 81)) == 0x05
    # No host has 203.0.113.99: ARP fails and the proxy's kernel sends the
    # daemon an ICMP host unreachable quoting its SYN.
    assert socks_reply_code(client, es, connect_request("203.0.113.99", 80)) == 0x04
    url, *proxy = socks_url(tb, 5000)
    rc, digest = curl_sha256(client, url, *proxy)
    assert rc == 0 and digest == pattern_sha256(5000)


def test_api_connect_times_out_on_a_silent_server(tb: Testbed) -> None:
    server = tb.host("server")
    rule = ["-p", "tcp", "--dport", "83", "-j", "DROP"]
    server.cmd(["iptables", "-w", "-A", "INPUT", *rule], check=True)
    try:
        out = run_py(
            tb.host("proxy"),
            """
            import sys, time
            from daemon.api.client import SpliceClient, SpliceError
            with SpliceClient(sys.argv[1]) as api:
                t0 = time.monotonic()
                try:
                    api.connect((sys.argv[2], 83), timeout=1.5)
                except SpliceError as exc:
                    print(exc.code, round(time.monotonic() - t0, 1))
            """,
            str(tb.daemon_socket),
            tb.origin[0],
        )
    finally:
        server.cmd(["iptables", "-w", "-D", "INPUT", *rule])
    code, seconds = out.split()
    assert code == "ETIMEDOUT" and 1.4 <= float(seconds) < 5


@pytest.mark.parametrize("link", ["client-proxy", "proxy-server"])
def test_transfers_survive_loss_reordering_and_duplication(tb: Testbed, link: str) -> None:
    shaped = tb.link(link)
    try:
        shaped.shape("delay=5ms loss=2% reorder=10% duplicate=2% seed=7")
        url, *proxy = socks_url(tb, 4 << 20)
        rc, digest = curl_sha256(tb.host("client"), url, *proxy)
        assert rc == 0 and digest == pattern_sha256(4 << 20)
        ip, port = tb.origin
        es = tb.endpoint_socks
        up = loadgen(
            tb.host("client"),
            "--server",
            f"{ip}:{port}",
            "--size",
            "2M",
            "--socks5",
            f"{es[0]}:{es[1]}",
            "--upload",
            "--timeout",
            "120",
        )
        assert up[0]["ok"], up
        counters = shaped.shape_status()[1]
    finally:
        shaped.clear()
    seen = {d: counters[d] for d in ("a_to_b", "b_to_a")}
    assert sum(c["dropped"] for c in seen.values()) > 0
    assert sum(c["duplicated"] for c in seen.values()) > 0


def _tcp_packets(pcap: Path) -> list[tuple[bytes, bytes, int, int, int, bytes]]:
    """(src, dst, sport, dport, flags, options) of each Ethernet/IPv4/TCP frame."""
    data = pcap.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 0x0F) * 4
        tcp = frame[14 + ihl :]
        sport, dport = struct.unpack("!HH", tcp[:4])
        hlen = (tcp[12] >> 4) * 4
        out.append((frame[26:30], frame[30:34], sport, dport, tcp[13], bytes(tcp[20:hlen])))
    return out


def _options(raw: bytes) -> dict[int, bytes]:
    opts, i = {}, 0
    while i < len(raw):
        kind = raw[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        length = raw[i + 1]
        opts[kind] = raw[i + 2 : i + length]
        i += length
    return opts


def test_capture_shows_designed_syn_options_and_no_resets(tb: Testbed, tmp_path: Path) -> None:
    cp, ps = tmp_path / "cp.pcap", tmp_path / "ps.pcap"
    with (
        tb.link("client-proxy").capture(cp, snaplen=96),
        tb.link("proxy-server").capture(ps, snaplen=96),
    ):
        url, *proxy = socks_url(tb, 1 << 20)
        rc, digest = curl_sha256(tb.host("client"), url, *proxy)
        assert rc == 0 and digest == pattern_sha256(1 << 20)
    service = socket.inet_aton(tb.endpoint_socks[0])
    source = socket.inet_aton("198.51.100.2")
    cp_pkts, ps_pkts = _tcp_packets(cp), _tcp_packets(ps)
    synack = [p for p in cp_pkts if p[0] == service and p[4] & 0x12 == 0x12]
    assert synack, "no SYN-ACK from the daemon on the client link"
    opts = _options(synack[0][5])
    # The client-facing endpoint offers a real window scale (7, not the
    # thesis's 0: the translator rescales), MSS, SACK-permitted and timestamps.
    assert opts[3] == b"\x07" and struct.unpack("!H", opts[2])[0] == 1460
    assert 4 in opts and 8 in opts
    syn = [p for p in ps_pkts if p[0] == source and p[4] & 0x12 == 0x02]
    assert syn, "no SYN from the daemon on the server link"
    opts = _options(syn[0][5])
    assert 2 in opts and 3 in opts and 4 in opts and 8 in opts
    # The kernel peers never reset a connection of this clean session.
    assert not [p for p in cp_pkts + ps_pkts if p[4] & 0x04]


def _junk_packets(rng: random.Random, dst: bytes) -> Iterator[bytes]:
    """Malformed and unwanted packets toward the daemon's addresses."""
    src = socket.inet_aton("192.0.2.2")

    def ip(proto: int, payload: bytes, frag: int = 0x4000) -> bytes:
        hdr = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            rng.randrange(65536),
            frag,
            64,
            proto,
            0,
            src,
            dst,
        )
        return hdr + payload

    for _ in range(400):
        kind = rng.randrange(7)
        tcp = bytearray(rng.randbytes(20 + rng.randrange(0, 60)))
        tcp[2:4] = (1080).to_bytes(2, "big")
        if kind == 0:  # truncated TCP header
            yield ip(6, bytes(tcp[: rng.randrange(1, 20)]))
        elif kind == 1:  # data offset beyond the segment
            tcp[12] = 0xF0
            yield ip(6, bytes(tcp[:24]))
        elif kind == 2:  # garbage options with bad lengths
            tcp[12] = 0x80
            tcp[20:32] = bytes([2, 0, 3, 1, 8, 40, 5, 3, 1, 1, 4, 0])
            yield ip(6, bytes(tcp))
        elif kind == 3:  # random bytes, almost surely a bad checksum
            yield ip(6, bytes(tcp))
        elif kind == 4:  # an IP fragment
            yield ip(6, bytes(tcp), frag=0x2000 | rng.randrange(1, 100))
        elif kind == 5:  # not TCP
            yield ip(17, rng.randbytes(30))
        else:
            yield ip(rng.choice([1, 47, 132]), rng.randbytes(40))


def test_fuzzed_packets_do_not_disturb_a_running_transfer(tb: Testbed) -> None:
    before = daemon_stats(tb)["counters"]
    assert isinstance(before, dict)
    url, *proxy = socks_url(tb, 32 << 20)
    result: dict[str, object] = {}

    def transfer() -> None:
        result["curl"] = curl_sha256(tb.host("client"), url, *proxy)

    t = threading.Thread(target=transfer)
    t.start()
    packets = [p.hex() for p in _junk_packets(random.Random(5), socket.inet_aton("198.51.100.1"))]
    run_py(
        tb.host("client"),
        """
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for _ in range(5):
            for h in sys.stdin.read().split() if False else open(sys.argv[1]).read().split():
                try:
                    s.sendto(bytes.fromhex(h), ("198.51.100.1", 0))
                except OSError:
                    pass
        """,
        _write_tmp(packets),
    )
    t.join(120)
    assert result["curl"] == (0, pattern_sha256(32 << 20))
    after = daemon_stats(tb)["counters"]
    assert isinstance(after, dict)
    rejected = sum(
        after[k] - before[k] for k in ("malformed", "bad_checksum", "fragments", "not_tcp")
    )
    assert rejected > 500
    # ... and the daemon still serves new connections.
    url, *proxy = socks_url(tb, 1000)
    assert curl_sha256(tb.host("client"), url, *proxy) == (0, pattern_sha256(1000))


def _write_tmp(lines: list[str]) -> str:
    path = f"/tmp/tsplice-fuzz-{os.getpid()}-{random.randrange(1 << 30)}.hex"
    Path(path).write_text("\n".join(lines))
    return path


def test_api_misuse_gets_error_replies_and_the_daemon_carries_on(tb: Testbed) -> None:
    out = run_py(
        tb.host("proxy"),
        """
        import json, socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        f = s.makefile("rwb")
        for line in [b"not json", b'{"id": 1, "op": "nosuchop"}',
                     b'{"id": 2, "op": "close", "conn": 999999}',
                     b'{"id": 3, "op": "listen", "addr": ["203.0.113.9", 80]}',
                     b'{"id": 4, "op": "stats"}']:
            f.write(line + b"\\n"); f.flush()
            print(json.loads(f.readline()).get("error", "ok"))
        """,
        str(tb.daemon_socket),
    )
    assert out.split() == ["EBADREQ", "EUNKNOWNOP", "ENOENT", "EADDRNOTAVAIL", "ok"]


def test_socket_permissions_are_restrictive(tb: Testbed) -> None:
    mode = os.stat(tb.daemon_socket).st_mode & 0o777
    assert mode & 0o007 == 0


def test_daemon_runs_in_offload_mode_with_gso_both_ways(tb: Testbed) -> None:
    before = daemon_stats(tb)["counters"]
    # A download (the origin's kernel hands the daemon GSO super-packets) and
    # an upload (the daemon sends GSO super-packets the kernel cuts).
    url, *proxy = socks_url(tb, 8 << 20)
    assert curl_sha256(tb.host("client"), url, *proxy) == (0, pattern_sha256(8 << 20))
    ip, port = tb.origin
    es = tb.endpoint_socks
    up = loadgen(
        tb.host("client"),
        "--server",
        f"{ip}:{port}",
        "--size",
        "8M",
        "--socks5",
        f"{es[0]}:{es[1]}",
        "--upload",
    )
    assert up[0]["ok"], up
    stats = daemon_stats(tb)
    assert stats["mode"] == "offload"
    after = stats["counters"]
    assert after["gso_in"] > before["gso_in"] and after["gso_out"] > before["gso_out"]


_SLOW_PROXY = """
import hashlib, os, sys, time
from daemon.api.client import SpliceClient
with SpliceClient(sys.argv[1]) as api:
    lst = api.listen(("198.51.100.1", 7001))
    print("ready", flush=True)
    conn = lst.accept()
    while not os.path.exists(sys.argv[2]):  # the client says when it is stuck
        time.sleep(0.05)
    held = api.stats(conn.id)["bytes_in"]
    h, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 20):
        h.update(chunk)
        total += len(chunk)
    print(held, total, h.hexdigest(), flush=True)
"""

_STALLED_CLIENT = """
import hashlib, os, socket, sys, time
s = socket.create_connection(("198.51.100.1", 7001), timeout=10)
s.setblocking(False)
body = os.urandom(64 << 20)
sent, idle_since = 0, time.monotonic()
while time.monotonic() - idle_since < 1.5 and sent < len(body):
    try:
        sent += s.send(body[sent : sent + (1 << 20)])
        idle_since = time.monotonic()
    except BlockingIOError:
        time.sleep(0.01)
open(sys.argv[1], "w").close()
s.setblocking(True)
s.sendall(body[sent:])
s.close()
print(sent, hashlib.sha256(body).hexdigest())
"""


def test_a_proxy_that_stops_reading_closes_the_window_and_loses_nothing(
    tb: Testbed, tmp_path: Path
) -> None:
    """Backpressure: the daemon holds a bounded amount, then the TCP window closes."""
    go = tmp_path / "go"
    proxy = tb.host("proxy").popen(
        [sys.executable, "-c", _SLOW_PROXY, str(tb.daemon_socket), str(go)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        sent, digest = run_py(tb.host("client"), _STALLED_CLIENT, str(go)).split()
        held, total, got = proxy.stdout.readline().split()
    finally:
        proxy.kill()
        proxy.wait()
    # While the proxy did not read, the client could push only what fits in
    # its own socket buffer, the daemon's receive buffer and the socketpair:
    # a few MB, not the 64 MB it tried.
    assert 0 < int(sent) < 16 << 20
    assert int(held) <= 4 << 20
    assert int(total) == 64 << 20 and got == digest


def test_a_client_reusing_its_port_during_time_wait_connects_again(tb: Testbed) -> None:
    assert same_port_twice(tb.host("client"), tb.endpoint_socks, tb.origin) == "20000 20000"


RESET_WATCHER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.2", 8084))
s.listen()
print("ready", flush=True)
c, _ = s.accept()
got = 0
try:
    while chunk := c.recv(65536):
        got += len(chunk)
    print("eof", got, flush=True)
except ConnectionResetError:
    print("reset", got, flush=True)
"""


def test_abort_resets_the_peer_and_refuses_a_spliced_conn(tb: Testbed) -> None:
    """The abort op (RFC 9293 3.10.5): the peer sees RST, not FIN; a spliced conn is ESTATE."""
    watcher = tb.host("server").popen(
        [sys.executable, "-c", RESET_WATCHER], stdout=subprocess.PIPE, text=True
    )
    client: subprocess.Popen[str] | None = None
    try:
        assert watcher.stdout is not None and watcher.stdout.readline().strip() == "ready"
        client = tb.host("client").popen(
            [
                sys.executable,
                "-c",
                # Until the proxy listens, the daemon refuses (RST): retry, no fixed sleep.
                "import socket, sys, time\n"
                "deadline = time.monotonic() + 10\n"
                "while True:\n"
                "    try:\n"
                "        s = socket.create_connection(('198.51.100.1', 7040), timeout=10)\n"
                "        break\n"
                "    except ConnectionRefusedError:\n"
                "        assert time.monotonic() < deadline\n"
                "        time.sleep(0.02)\n"
                "s.sendall(b'GO')\n"
                # Not before the proxy's abort was tried: a splice that has ended
                # is forgotten, and abort on a forgotten conn is quiet, not ESTATE.
                "sys.stdin.readline()\n"
                # Spliced to the raw sink: our FIN reaches it, it answers and closes.
                "s.shutdown(socket.SHUT_WR)\n"
                "while s.recv(65536):\n"
                "    pass\n",
            ],
            stdin=subprocess.PIPE,
            text=True,
        )
        out = run_py(
            tb.host("proxy"),
            """
            import sys
            from daemon.api.client import SpliceClient, SpliceError
            with SpliceClient(sys.argv[1]) as api:
                conn = api.connect((sys.argv[2], 8084), timeout=5)
                conn.sendall(b"x" * 1000)
                conn.abort()
                lst = api.listen(("198.51.100.1", 7040))
                cli = lst.accept(timeout=10)
                assert cli.recv(2) == b"GO"
                api.connect_splice(cli, (sys.argv[2], 9000), 0, timeout=5)
                try:
                    cli.abort()
                except SpliceError as exc:
                    print(exc.code)
                else:
                    print("quiet")  # the daemon had forgotten the conn (or went away)
                cli.close()
            """,
            str(tb.daemon_socket),
            tb.origin[0],
        )
        assert client.stdin is not None
        client.stdin.write("\n")
        client.stdin.close()
        assert client.wait(timeout=20) == 0
        assert out.split() == ["ESTATE"]
        verdict = watcher.stdout.readline().split()
        assert verdict[0] == "reset", verdict
    finally:
        for proc in (watcher, client):
            if proc is not None:
                proc.kill()
                proc.wait()


SILENT_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8086))
s.listen()
print("ready", flush=True)
c, _ = s.accept()
sys.stdin.readline()  # hold the connection, say nothing, until told
"""


def test_keepalive_probes_an_idle_peer_and_times_out_a_vanished_one(tb: Testbed) -> None:
    """RFC 9293 3.8.4 through the API: the kernel peer answers the probes; once it is
    silently gone (its packets dropped), the conn times out and the proxy is told."""
    server_host = tb.host("server")
    server = server_host.popen(
        [sys.executable, "-c", SILENT_SERVER, tb.origin[0]],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    rule = ["OUTPUT", "-p", "tcp", "--sport", "8086", "-j", "DROP"]
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        proxy = tb.host("proxy").popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    """
                    import sys, time
                    from daemon.api.client import SpliceClient
                    with SpliceClient(sys.argv[1]) as api:
                        conn = api.connect((sys.argv[2], 8086), timeout=5)
                        conn.set_keepalive(0.3, interval=0.2, count=3)
                        # More probes than count: each was answered, or the
                        # conn would have timed out after the third.
                        deadline = time.monotonic() + 10
                        while True:
                            st = api.stats(conn.id)
                            if st["keepalive_probes"] > 3 or time.monotonic() > deadline:
                                break
                            time.sleep(0.05)
                        print(st["state"], st["keepalive_probes"], flush=True)
                        sys.stdin.readline()  # the test drops the peer's packets now
                        started = time.monotonic()
                        event = api.next_event(timeout=10)
                        print(event and event["event"], round(time.monotonic() - started, 1))
                    """
                ),
                str(tb.daemon_socket),
                tb.origin[0],
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        assert proxy.stdout is not None and proxy.stdin is not None
        state, probes = proxy.stdout.readline().split()
        # Idle 0.3 s, then a probe every 0.2 s, each answered: still up past count.
        assert state == "ESTABLISHED" and int(probes) > 3
        server_host.cmd(["iptables", "-A", *rule], check=True)
        proxy.stdin.write("go\n")
        proxy.stdin.flush()
        kind, _after = proxy.stdout.readline().split()
        assert kind == "timed_out"
        assert proxy.wait(timeout=20) == 0
    finally:
        server_host.cmd(["iptables", "-D", *rule])
        server.kill()
        server.wait()


PMTU_UPLOAD = """
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
"""


def upload_over_shrinking_link(
    tb: Testbed, sink: tuple[str, int], mtu: int
) -> tuple[int, str, int, int]:
    """A daemon connection to the sink; the proxy-server link drops to ``mtu`` after the
    handshake; 4 MB uploaded and hashed by the sink.  (MSS before, verdict, MSS after,
    PMTU updates.)"""
    ps = tb.link("proxy-server")
    proxy = tb.host("proxy").popen(
        [sys.executable, "-c", PMTU_UPLOAD, str(tb.daemon_socket), *map(str, sink)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdin is not None
        kind, before = proxy.stdout.readline().split()
        assert kind == "mss"
        ps.set_mtu(mtu)
        proxy.stdin.write("go\n")
        proxy.stdin.flush()
        verdict, after, updates = proxy.stdout.readline().split()
        assert proxy.wait(timeout=20) == 0
        return int(before), verdict, int(after), int(updates)
    finally:
        ps.set_mtu(1500)
        proxy.kill()
        proxy.wait()


def test_path_mtu_drop_mid_connection_lowers_the_segment_size(tb: Testbed) -> None:
    """RFC 1191: the link toward the server shrinks after the handshake (MSS 1460);
    the router's ICMP "fragmentation needed" must cut the daemon's segments, or
    the upload is a black hole.  The sink checks every byte by hash."""
    before, verdict, after, updates = upload_over_shrinking_link(tb, tb.sink, 1200)
    assert before > 1200 and verdict == "ok"
    assert after <= 1200 - 40 and updates >= 1
