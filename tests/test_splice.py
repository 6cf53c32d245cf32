"""Symmetric TCP splice against the kernel stacks of the testbed (issue 4's proof).

curl and our client in the client namespace, the origin's kernel TCP in the
server namespace, the spliced SOCKS5 and HTTP/1.0 proxies in between: after
the splice the daemon relays packets, rewriting headers (thesis 5.2-5.4).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from testbed import process
from testbed.net import Testbed
from testbed.pcap import tcp_frames
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

MSL = 1.0  # short, so TIMEWAIT (2 MSL) ends within the test


@pytest.fixture(scope="module")
def tb(spliced_tb: Testbed) -> Testbed:
    """Every test here runs twice: spliced flows in the kernel fast path, and in Python."""
    return spliced_tb


def stats(tb: Testbed) -> dict[str, Any]:
    return daemon_stats(tb)


def wait_until_idle(tb: Testbed, timeout: float = 15.0) -> dict[str, Any]:
    """Poll until the daemon holds no connection and no splice (2 MSL after the end)."""
    deadline = time.monotonic() + timeout
    while True:
        st = stats(tb)
        if st["connections"] == 0 and not st["splices"]:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon still holds state: {st}")
        time.sleep(0.2)


def socks(tb: Testbed) -> list[str]:
    return ["--socks5", "{}:{}".format(*tb.spliced_socks)]


def url(tb: Testbed, size: int) -> str:
    return "http://{}:{}/bytes/{}".format(*tb.origin, size)


# ---------------------------------------------------------------- transfers


@pytest.mark.parametrize("size", [1024, 1 << 20, 64 << 20, 256 << 20])
def test_spliced_socks5_download_is_intact(tb: Testbed, size: int) -> None:
    rc, digest = curl_sha256(tb.host("client"), url(tb, size), *socks(tb))
    assert rc == 0 and digest == pattern_sha256(size)


@pytest.mark.parametrize("size", ["1K", "1M", "64M"])
def test_spliced_socks5_upload_is_checked_by_the_sink(tb: Testbed, size: str) -> None:
    results = loadgen(
        tb.host("client"),
        "--server",
        "{}:{}".format(*tb.origin),
        "--size",
        size,
        *socks(tb),
        "--upload",
        "--timeout",
        "120",
    )
    assert len(results) == 1 and results[0]["ok"], results


@pytest.mark.parametrize("size", [1024, 1 << 20, 64 << 20])
def test_http_proxy_miss_is_spliced_and_intact(tb: Testbed, size: int) -> None:
    # A size no other test asks for: the first request is surely a miss.
    size += 7
    proxy = "http://{}:{}".format(*tb.http_proxy)
    rc, digest = curl_sha256(tb.host("client"), url(tb, size), "-x", proxy)
    assert rc == 0 and digest == pattern_sha256(size)


def test_http_proxy_serves_a_hit_from_its_cache(tb: Testbed) -> None:
    proxy = "http://{}:{}".format(*tb.http_proxy)
    target = url(tb, 4321)
    client = tb.host("client")
    first = client.cmd(["curl", "-sS", "-D", "-", "-o", "/dev/null", "-x", proxy, target])
    assert first.returncode == 0 and "X-Cache: HIT" not in first.stdout
    deadline = time.monotonic() + 10
    while True:  # the cache is filled out of band, right after the spliced miss
        again = client.cmd(["curl", "-sS", "-D", "-", "-o", "/dev/null", "-x", proxy, target])
        if "X-Cache: HIT" in again.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "X-Cache: HIT" in again.stdout
    rc, digest = curl_sha256(client, target, "-x", proxy)
    assert rc == 0 and digest == pattern_sha256(4321)


def test_the_path_that_carries_spliced_bytes_is_the_one_asked_for(tb: Testbed) -> None:
    before = stats(tb)
    size = 64 << 20
    rc, digest = curl_sha256(tb.host("client"), url(tb, size), *socks(tb))
    assert rc == 0 and digest == pattern_sha256(size)
    after = stats(tb)
    fp = after["fast_path"]
    relayed = after["splice_counters"]["relayed"] - before["splice_counters"]["relayed"]
    if tb.fastpath == "on":
        assert fp["running"], fp
        moved = (
            fp["counters"]["redirected_bytes"] - before["fast_path"]["counters"]["redirected_bytes"]
        )
        # The handshake, the SOCKS exchange and the FINs are the daemon's;
        # nearly every byte of the payload is the kernel's.
        assert moved >= size * 0.95, (moved, fp)
        assert relayed < 200, relayed
    else:
        assert not fp["running"] and "off" in fp["reason"]
        assert relayed > size // 65536  # at most one 64 KB super-packet per relay


def test_the_proxy_reads_none_of_the_payload_after_splice(tb: Testbed) -> None:
    rec = process.load(tb.run_dir, "socks5-spliced")
    assert rec is not None
    proxy = psutil.Process(rec.pid)
    before = proxy.io_counters()
    size = 64 << 20
    rc, digest = curl_sha256(tb.host("client"), url(tb, size), *socks(tb))
    after = proxy.io_counters()
    assert rc == 0 and digest == pattern_sha256(size)
    # The SOCKS negotiation and a few API lines, not 64 MB.
    assert after.read_chars - before.read_chars < 64 << 10
    assert after.write_chars - before.write_chars < 64 << 10
    st = stats(tb)
    assert st["splice_counters"]["spliced"] >= 1


def test_half_close_through_the_splice(tb: Testbed) -> None:
    assert half_close_through_socks(tb.host("client"), tb.spliced_socks, tb.sink, 6 << 20)


# ------------------------------------------------------------- failures


def test_refused_server_gives_0x05_and_leaves_nothing_behind(tb: Testbed) -> None:
    code = socks_reply_code(tb.host("client"), tb.spliced_socks, connect_request(tb.origin[0], 81))
    assert code == 0x05
    wait_until_idle(tb)


def test_unreachable_server_gives_0x04(tb: Testbed) -> None:
    code = socks_reply_code(
        tb.host("client"), tb.spliced_socks, connect_request("203.0.113.99", 80)
    )
    assert code == 0x04


RESETTING_SERVER = """
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.2", 8081))
s.listen()
print("ready", flush=True)
c, _ = s.accept()
c.recv(100)
c.sendall(b"x" * (2 << 20))
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()   # SO_LINGER 0: RST, mid-stream from the client's point of view
"""


def test_rst_from_the_server_mid_transfer_reaches_the_client(tb: Testbed) -> None:
    server = tb.host("server").popen(
        [sys.executable, "-c", RESETTING_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        out = run_py(
            tb.host("client"),
            """
            import socket, sys
            from clients.socks5 import socks5_connect
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
            socks5_connect(s, "203.0.113.2", 8081)
            s.sendall(b"go")
            got = 0
            try:
                while chunk := s.recv(1 << 16):
                    got += len(chunk)
                print("eof", got)
            except ConnectionResetError:
                print("reset", got)
            """,
            *map(str, tb.spliced_socks),
        )
    finally:
        server.kill()
        server.wait()
    assert out.split()[0] == "reset"
    wait_until_idle(tb)


def test_state_is_freed_after_2msl_and_late_segments_get_a_reset(tb: Testbed) -> None:
    out = run_py(
        tb.host("client"),
        """
        import socket, sys
        from clients.socks5 import socks5_connect
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        socks5_connect(s, sys.argv[3], int(sys.argv[4]))
        s.sendall(b"GET /bytes/100000 HTTP/1.0\\r\\n\\r\\n")
        n = 0
        while chunk := s.recv(65536):
            n += len(chunk)
        print(s.getsockname()[1], n)
        s.close()
        """,
        *map(str, tb.spliced_socks),
        *map(str, tb.origin),
    )
    port, n = map(int, out.split())
    assert n > 100000
    st = stats(tb)
    states = {(s["client_state"], s["server_state"]) for s in st["splices"]}
    assert states <= {("TIMEWAIT", "TIMEWAIT")}, st["splices"]
    idle = wait_until_idle(tb, timeout=4 * MSL + 10)
    resets = idle["counters"]["resets_sent"]
    # A late ACK on the forgotten 4-tuple: the daemon answers RST (RFC 9293 3.10.7.1).
    run_py(
        tb.host("client"),
        """
        import socket, struct, sys
        port = int(sys.argv[1])
        tcp = struct.pack("!HHIIBBHHH", port, 1080, 1000, 2000, 5 << 4, 0x10, 1000, 0, 0)
        src, dst = socket.inet_aton("192.0.2.2"), socket.inet_aton("198.51.100.1")
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        data = pseudo + tcp
        total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        tcp = tcp[:16] + struct.pack("!H", ~total & 0xFFFF) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, 6, 0, src, dst)
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.sendto(ip + tcp, ("198.51.100.1", 0))
        """,
        str(port),
    )
    deadline = time.monotonic() + 5
    while stats(tb)["counters"]["resets_sent"] == resets and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats(tb)["counters"]["resets_sent"] > resets


# -------------------------------------------------- options, MTU, impairments

# Each of timestamps, SACK and window scaling on or off in the client and in
# the server namespace: 2^6 combinations.
KNOBS = ("timestamps", "sack", "window_scaling")


def _set_knobs(tb: Testbed, role: str, values: tuple[int, ...], current: dict[str, int]) -> None:
    host = tb.host(role)
    for knob, value in zip(KNOBS, values, strict=True):
        key = f"{role}.{knob}"
        if current.get(key) != value:
            host.sysctl(f"net.ipv4.tcp_{knob}", value)
            current[key] = value


# (client family, server family): IPv4 throughout, IPv6 throughout, and a
# splice across families (tests/test_splice_ipv6.py has the rest of them).
FAMILY_PAIRS = [
    pytest.param((4, 4), id="v4"),
    pytest.param((6, 6), id="v6"),
    pytest.param((6, 4), id="v6-to-v4"),
]


def ends(tb: Testbed, families: tuple[int, int]) -> list[str]:
    """The spliced SOCKS5, the origin and the sink for ``_DOWN_AND_UP``, in those families."""
    client, server = families
    socks5 = tb.spliced_socks6 if client == 6 else tb.spliced_socks
    origin = tb.origin6 if server == 6 else tb.origin
    sink = tb.sink6 if server == 6 else tb.sink
    return [*map(str, socks5), *map(str, origin), *map(str, sink)]


@pytest.mark.parametrize("families", FAMILY_PAIRS)
def test_every_option_combination_transfers_intact_both_ways(
    tb: Testbed, families: tuple[int, int]
) -> None:
    current: dict[str, int] = {}
    failures = []
    try:
        for combo in itertools.product((1, 0), repeat=6):
            _set_knobs(tb, "client", combo[:3], current)
            _set_knobs(tb, "server", combo[3:], current)
            out = run_py(tb.host("client"), _DOWN_AND_UP, *ends(tb, families))
            if out.split() != ["ok", "ok"]:
                failures.append(
                    (
                        dict(
                            zip(
                                [f"client.{k}" for k in KNOBS] + [f"server.{k}" for k in KNOBS],
                                combo,
                                strict=True,
                            )
                        ),
                        out.strip(),
                    )
                )
    finally:
        _set_knobs(tb, "client", (1, 1, 1), current)
        _set_knobs(tb, "server", (1, 1, 1), current)
    assert not failures, failures


_DOWN_AND_UP = """
import hashlib, os, socket, sys
from clients.socks5 import socks5_connect
from servers.pattern import PatternVerifier
sx, sp, ox, op, kx, kp = sys.argv[1:7]
size = 3 << 20
s = socket.create_connection((sx, int(sp)), timeout=30)
socks5_connect(s, ox, int(op))
s.sendall(b"GET /bytes/%d HTTP/1.0\\r\\n\\r\\n" % size)
data = b""
while chunk := s.recv(1 << 16):
    data += chunk
body = data.split(b"\\r\\n\\r\\n", 1)[1]
v = PatternVerifier()
v.feed(body)
print("ok" if v.ok and len(body) == size else f"down-bad:{len(body)}")
s = socket.create_connection((sx, int(sp)), timeout=30)
socks5_connect(s, kx, int(kp))
up = os.urandom(2 << 20)
s.sendall(up)
s.shutdown(socket.SHUT_WR)
answer = b""
while chunk := s.recv(1 << 16):
    answer += chunk
print("ok" if answer.decode().strip() == hashlib.sha256(up).hexdigest() else "up-bad")
"""


@pytest.mark.parametrize("families", FAMILY_PAIRS)
@pytest.mark.parametrize(("client_mtu", "server_mtu"), [(1500, 1280), (9000, 1500)])
def test_mtu_mismatch_transfers_intact_both_ways(
    tb: Testbed, client_mtu: int, server_mtu: int, families: tuple[int, int]
) -> None:
    # 1280 is IPv6's minimum link MTU (RFC 8200 5).
    cp, ps = tb.link("client-proxy"), tb.link("proxy-server")
    try:
        cp.set_mtu(client_mtu)
        ps.set_mtu(server_mtu)
        out = run_py(tb.host("client"), _DOWN_AND_UP, *ends(tb, families))
    finally:
        cp.set_mtu(1500)
        ps.set_mtu(1500)
    assert out.split() == ["ok", "ok"], out


@pytest.mark.parametrize("families", FAMILY_PAIRS)
@pytest.mark.parametrize("link", ["client-proxy", "proxy-server"])
@pytest.mark.parametrize("impairment", ["loss=2%", "delay=5ms reorder=25%", "duplicate=5%"])
def test_impaired_links_before_and_after_the_splice_point(
    tb: Testbed, link: str, impairment: str, families: tuple[int, int]
) -> None:
    shaped = tb.link(link)
    try:
        # Shaped from the handshakes on: the impairment hits the proxy's
        # own TCP before the splice and the relayed packets after it.
        shaped.shape(impairment + " seed=11")
        out = run_py(tb.host("client"), _DOWN_AND_UP, *ends(tb, families))
        # The impairment process writes its counters about once a second.
        deadline = time.monotonic() + 5
        seen = 0
        while seen < 1000 and time.monotonic() < deadline:
            counters = shaped.shape_status()[1]
            seen = sum(counters.get(d, {}).get("seen", 0) for d in ("a_to_b", "b_to_a"))
            time.sleep(0.2)
    finally:
        shaped.clear()
    assert out.split() == ["ok", "ok"], out
    assert seen > 1000


# ------------------------------------------------------ capture consistency


def _read_pcap(path: Path) -> list[tuple[bytes, int, bytes, int, int, int, int, bytes, int]]:
    """(src, sport, dst, dport, flags, seq, ack, options, payload_len) per TCP frame."""
    return [
        (f.src, f.sport, f.dst, f.dport, f.flags, f.seq, f.ack, f.options, f.payload_len)
        for f in tcp_frames(path)
    ]


def _opts(raw: bytes) -> dict[int, bytes]:
    found, i = {}, 0
    while i < len(raw) and raw[i] != 0:
        if raw[i] == 1:
            i += 1
            continue
        if i + 1 >= len(raw) or raw[i + 1] < 2:
            break
        found[raw[i]] = raw[i + 2 : i + raw[i + 1]]
        i += raw[i + 1]
    return found


def _check_link(packets: list[Any], a_port: int) -> list[str]:
    """Check one connection of a link against its own handshake.

    Every seq of each side lies in [ISN, ISN + bytes sent + 2], every ack and
    SACK block edge in the other side's range, and every TSecr echoes a TSval
    the other side really sent on this link.
    """
    flow = [p for p in packets if a_port in (p[1], p[3])]
    syn = next(p for p in flow if p[4] & 0x12 == 0x02)
    a = (syn[0], syn[1])
    isn: dict[tuple[bytes, int], int] = {a: syn[5]}
    synack = next(p for p in flow if p[4] & 0x12 == 0x12)
    b = (synack[0], synack[1])
    isn[b] = synack[5]
    sent = {a: 0, b: 0}
    for p in flow:
        src = (p[0], p[1])
        sent[src] = max(sent[src], (p[5] - isn[src]) % (1 << 32) + p[8])
    tsvals: dict[tuple[bytes, int], set[int]] = {a: set(), b: set()}
    errors = []
    for p in flow:
        src = (p[0], p[1])
        dst = b if src == a else a
        if (p[5] - isn[src]) % (1 << 32) > sent[src] + 2:
            errors.append(f"seq {p[5]} outside {src} space")
        if p[4] & 0x10 and (p[6] - isn[dst]) % (1 << 32) > sent[dst] + 2:
            errors.append(f"ack {p[6]} outside {dst} space")
        o = _opts(p[7])
        if 8 in o and len(o[8]) == 8:
            tsval, tsecr = struct.unpack("!II", o[8])
            tsvals[src].add(tsval)
            if p[4] & 0x10 and tsecr and tsecr not in tsvals[dst]:
                errors.append(f"TSecr {tsecr} never sent by {dst}")
        if 5 in o:
            for i in range(0, len(o[5]) - 7, 8):
                left, right = struct.unpack("!II", o[5][i : i + 8])
                for edge in (left, right):
                    if (edge - isn[dst]) % (1 << 32) > sent[dst] + 2:
                        errors.append(f"SACK edge {edge} outside {dst} space")
    return errors[:10]


@pytest.mark.parametrize("families", FAMILY_PAIRS)
def test_capture_numbers_are_consistent_with_each_links_handshake(
    tb: Testbed, tmp_path: Path, families: tuple[int, int]
) -> None:
    cp_pcap, ps_pcap = tmp_path / "cp.pcap", tmp_path / "ps.pcap"
    shaped = tb.link("client-proxy")
    try:
        shaped.shape("loss=1% seed=3")  # losses make the client send SACK blocks
        with (
            tb.link("client-proxy").capture(cp_pcap, snaplen=128),
            tb.link("proxy-server").capture(ps_pcap, snaplen=128),
        ):
            out = run_py(
                tb.host("client"),
                """
                import socket, sys
                from clients.socks5 import socks5_connect
                s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
                socks5_connect(s, sys.argv[3], int(sys.argv[4]))
                s.sendall(b"GET /bytes/8000000 HTTP/1.0\\r\\n\\r\\n")
                n = 0
                while chunk := s.recv(65536):
                    n += len(chunk)
                print(s.getsockname()[1], n)
                """,
                *ends(tb, families)[:4],
            )
    finally:
        shaped.clear()
    client_port, n = map(int, out.split())
    assert n > 8000000
    cp = _read_pcap(cp_pcap)
    ps = _read_pcap(ps_pcap)
    assert _check_link(cp, client_port) == []
    # The server-side connection: the daemon's port toward the origin's :80.
    origin_port = int(ends(tb, families)[3])
    server_ports = {p[1] for p in ps if p[3] == origin_port and p[4] & 0x12 == 0x02}
    assert server_ports, "no SYN toward the origin on the server link"
    errors = [e for port in server_ports for e in _check_link(ps, port)]
    assert errors == []
    sacks = sum(1 for p in cp if 5 in _opts(p[7]))
    assert sacks > 0, "the lossy link produced no SACK blocks to check"


def test_stats_show_each_splice_per_interface(tb: Testbed) -> None:
    proc = tb.host("client").popen(
        ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "4M", *socks(tb), url(tb, 64 << 20)]
    )
    try:
        deadline = time.monotonic() + 10
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not seen:
            seen = [
                s
                for s in stats(tb)["splices"]
                if s["bytes_s2c"] > 0 and s["client_state"] == s["server_state"] == "SPLICED"
            ]
            time.sleep(0.1)
    finally:
        proc.kill()  # the slow download has served its purpose
        proc.wait(30)
    assert seen and seen[0]["client_state"] == "SPLICED" and seen[0]["server_state"] == "SPLICED"


def test_data_pipelined_behind_the_socks_request_reaches_the_server(tb: Testbed) -> None:
    """Optimistic data sent before the SOCKS reply (thesis 4.1: the proxy must not
    read it; it was already in the proxy's fd and is handed back at splice)."""
    out = run_py(
        tb.host("client"),
        """
        import socket, sys
        from servers.pattern import PatternVerifier
        sx, sp, ox, op = sys.argv[1:5]
        s = socket.create_connection((sx, int(sp)), timeout=30)
        a, b, c, d = map(int, ox.split("."))
        req = bytes([5, 1, 0, 5, 1, 0, 1, a, b, c, d]) + int(op).to_bytes(2, "big")
        get = b"GET /bytes/300000 HTTP/1.0\\r\\n\\r\\n"
        s.sendall(req + get)  # greeting, request and the HTTP GET in one go
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data[:2] == b"\\x05\\x00" and data[2:4] == b"\\x05\\x00", data[:12]
        body = data[14:].split(b"\\r\\n\\r\\n", 1)[1]
        v = PatternVerifier()
        v.feed(body)
        print(len(body), v.ok)
        """,
        *map(str, tb.spliced_socks),
        *map(str, tb.origin),
    )
    assert out.split() == ["300000", "True"]


def test_http_proxy_post_body_is_carried_by_the_splice(tb: Testbed) -> None:
    proxy = "http://{}:{}".format(*tb.http_proxy)
    out = run_py(
        tb.host("client"),
        """
        import hashlib, os, subprocess, sys
        body = os.urandom(2 << 20)
        path = "/tmp/post-" + str(os.getpid())
        with open(path, "wb") as f:
            f.write(body)
        res = subprocess.run(["curl", "-sS", "-x", sys.argv[1], "--data-binary", "@" + path,
                              sys.argv[2]], capture_output=True, text=True)
        os.unlink(path)
        print(res.returncode, hashlib.sha256(body).hexdigest() in res.stdout)
        """,
        proxy,
        "http://{}:{}/sink".format(*tb.origin),
    )
    assert out.split() == ["0", "True"]


OVERRUNNING_PROXY = """
import sys
from daemon.api.client import SpliceClient
with SpliceClient(sys.argv[1]) as api:
    lst = api.listen(("198.51.100.1", 7010))
    print("ready", flush=True)
    cli = lst.accept()
    cli.recv(100)                         # the client's hello
    srv = api.intend_splice(cli)
    srv.connect((sys.argv[2], int(sys.argv[3])), timeout=5)
    api.splice(cli, srv, 3)
    cli.sendall(b"ok\\n" + b"TOO MUCH")    # 3 allowed bytes, then 8 too many
    srv.sendall(b"nor this")              # nothing may go to the server side
    events = [api.next_event(timeout=5), api.next_event(timeout=5)]
    ids = {e["conn"] for e in events if e}
    print(ids == {cli.id, srv.id}, events[0]["event"], events[0]["error"], flush=True)
    cli.close()
    srv.close()
"""


def test_writing_more_than_len_after_splice_is_refused_and_reported(tb: Testbed) -> None:
    proxy = tb.host("proxy").popen(
        [sys.executable, "-c", OVERRUNNING_PROXY, str(tb.daemon_socket), *map(str, tb.sink)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        out = run_py(
            tb.host("client"),
            """
            import socket
            s = socket.create_connection(("198.51.100.1", 7010), timeout=10)
            s.sendall(b"hello")
            got = s.recv(100)
            s.sendall(b"payload")
            s.shutdown(socket.SHUT_WR)   # the sink answers the SHA-256 of what it got
            rest = b""
            while chunk := s.recv(100):
                rest += chunk
            print(got, rest.decode().strip())
            """,
        )
        report = proxy.stdout.readline().split()
    finally:
        proxy.kill()
        proxy.wait()
    got, digest = out.split()
    # Only the 3 announced bytes reached the client; the server side saw only
    # what the client sent after the splice, not the proxy's "nor this".
    assert got == "b'ok\\n'"
    assert digest == hashlib.sha256(b"payload").hexdigest()
    assert report == ["True", "error", "ESTATE"]


def test_a_client_reusing_its_port_during_timewait_gets_a_new_splice(tb: Testbed) -> None:
    assert same_port_twice(tb.host("client"), tb.spliced_socks, tb.origin) == "20000 20000"
    assert stats(tb)["splice_counters"]["timewait_reopened"] >= 1


DYING_PROXY = """
import os, signal, sys
from daemon.api.client import SpliceClient
api = SpliceClient(sys.argv[1])
lst = api.listen(("198.51.100.1", int(sys.argv[4])))
print("ready", flush=True)
spliced = lst.accept()               # the client connects these two in this order
pending = lst.accept()
srv = api.intend_splice(spliced)
srv.connect((sys.argv[2], int(sys.argv[3])), timeout=5)
api.splice(spliced, srv, 0)          # this pair is spliced: it must outlive the proxy
api.intend_splice(pending)           # this one is not: it must be closed when we die
print("dying", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_proxy_that_dies_leaves_spliced_pairs_flowing_and_closes_the_rest(
    tb: Testbed,
) -> None:
    port = 7020
    proxy = tb.host("proxy").popen(
        [sys.executable, "-c", DYING_PROXY, str(tb.daemon_socket), *map(str, tb.origin), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        out = run_py(
            tb.host("client"),
            """
            import socket, sys
            from servers.pattern import PatternVerifier
            port = int(sys.argv[1])
            spliced = socket.create_connection(("198.51.100.1", port), timeout=20)
            pending = socket.create_connection(("198.51.100.1", port), timeout=20)
            pending.sendall(b"hello")
            # The proxy splices the first, then is killed: the pending one must
            # end cleanly, and only then does the client use the spliced one.
            try:
                end = pending.recv(100)
                outcome = "eof" if end == b"" else "data"
            except ConnectionResetError:
                outcome = "reset"
            # The spliced one still reaches the origin through the daemon.
            spliced.sendall(b"GET /bytes/2000000 HTTP/1.0\\r\\n\\r\\n")
            data = b""
            while chunk := spliced.recv(65536):
                data += chunk
            body = data.split(b"\\r\\n\\r\\n", 1)[1]
            v = PatternVerifier()
            v.feed(body)
            print(outcome, len(body), v.ok)
            """,
            str(port),
        )
        assert proxy.wait(10) == -9
    finally:
        if proxy.poll() is None:
            proxy.kill()
        proxy.wait()
    outcome, size, ok = out.split()
    assert outcome in ("eof", "reset") and size == "2000000" and ok == "True"
    wait_until_idle(tb, timeout=4 * MSL + 10)


CONNECT_SPLICE_PROXY = """
import base64, sys
from daemon.api.client import Connection, SpliceClient
inline = sys.argv[4] == "inline"
with SpliceClient(sys.argv[1]) as api:
    lst = api.listen(("198.51.100.1", 7030))
    print("ready", flush=True)
    for _ in range(2):
        cli = lst.accept()
        assert cli.recv(6) == b"hello\\n"   # whatever follows stays unread in the fd
        args = {"client": cli.id, "remote": [sys.argv[2], int(sys.argv[3])]}
        if inline:  # the reply with the request; the daemon lets go of both conns
            args.update(data=base64.b64encode(b"ok\\n").decode(), release=True)
        else:
            args.update(len=3)
        reply, sock = api._call_fd("connect_splice", **args)
        print(reply["spliced"], flush=True)
        if reply["spliced"] and inline:
            assert reply["released"] is True and sock is None, (reply, sock)
            cli.sock.close()
            continue
        assert sock is not None and "released" not in reply
        srv = Connection._from_reply(api, reply, sock)
        if not reply["spliced"]:
            api.splice(cli, srv, 3)  # hands the unread bytes back
        cli.sendall(b"ok\\n")
        cli.close()
        srv.close()
    assert api.list()["conns"] == []
    print("clean", flush=True)
"""


@pytest.mark.parametrize("reply", ["written", "inline"])
def test_connect_splice_splices_at_once_unless_the_proxy_left_bytes_unread(
    tb: Testbed, reply: str
) -> None:
    """Also with the reply inline and release: when the splice is left to the proxy
    (unread bytes), the daemon sends and releases nothing and hands over the fd."""
    proxy = tb.host("proxy").popen(
        [
            sys.executable,
            "-c",
            CONNECT_SPLICE_PROXY,
            str(tb.daemon_socket),
            *map(str, tb.sink),
            reply,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    client = """
        import socket, sys, time
        s = socket.create_connection(("198.51.100.1", 7030), timeout=10)
        # The second client sends its payload with the hello: the proxy reads
        # only the hello, so the daemon must leave the splice to the proxy.
        early = sys.argv[1] == "early"
        s.sendall(b"hello\\n" + (b"payload" if early else b""))
        assert s.recv(3) == b"ok\\n"
        if not early:
            s.sendall(b"payload")
        s.shutdown(socket.SHUT_WR)
        print(s.recv(100).decode().strip())
        """
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        digest = hashlib.sha256(b"payload").hexdigest()
        assert run_py(tb.host("client"), client, "late").strip() == digest
        assert proxy.stdout.readline().strip() == "True"
        assert run_py(tb.host("client"), client, "early").strip() == digest
        assert proxy.stdout.readline().strip() == "False"
        assert proxy.stdout.readline().strip() == "clean"
    finally:
        proxy.kill()
        proxy.wait()


# A proxy that splices N clients in turn, closing its descriptors at once,
# then reports how many conns the daemon still records for it.  "inline":
# the reply goes with connect_splice, with the bound address written into
# it by the daemon, and the daemon releases both conns itself.
RELEASING_PROXY = """
import socket, sys
from daemon.api.client import SpliceClient
origin, n, inline = (sys.argv[2], int(sys.argv[3])), int(sys.argv[4]), sys.argv[5] == "inline"
bound = []
with SpliceClient(sys.argv[1]) as api:
    lst = api.listen(("198.51.100.1", 7021), backlog=64)
    print("ready", flush=True)
    for _ in range(n):
        cli = lst.accept()
        assert cli.recv(3) == b"GO\\n"
        if inline:
            reply = b"OK\\n" + bytes(6)
            srv = api.connect_splice(
                cli, origin, data=reply, local_at=3, release=True, timeout=10
            )
            assert srv.released and cli.released
        else:
            srv = api.connect_splice(cli, origin, 9, timeout=10)
            cli.sendall(
                b"OK\\n" + socket.inet_aton(srv.local[0]) + srv.local[1].to_bytes(2, "big")
            )
        bound.append(f"{srv.local[0]}:{srv.local[1]}")
        cli.close()
        srv.close()
    sys.stdin.readline()
    print(len(api.list()["conns"]), *bound, flush=True)
"""

RELEASED_CLIENTS = """
import hashlib, socket, sys
for i in range(int(sys.argv[1])):
    s = socket.create_connection(("198.51.100.1", 7021), timeout=10)
    s.sendall(b"GO\\n")
    reply = b""
    while len(reply) < 9:
        reply += s.recv(9 - len(reply))
    assert reply[:3] == b"OK\\n", reply
    bound = f"{socket.inet_ntoa(reply[3:7])}:{int.from_bytes(reply[7:9], 'big')}"
    s.sendall(b"GET /bytes/65536 HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(1 << 16):
        data += chunk
    print(hashlib.sha256(data.partition(b"\\r\\n\\r\\n")[2]).hexdigest(), bound, flush=True)
    s.close()
"""


@pytest.mark.parametrize("reply", ["written", "inline"])
def test_closed_spliced_conns_leave_no_records_behind(tb: Testbed, reply: str) -> None:
    """Once the proxy closed both fds and both sides relay, the daemon keeps only the relay.

    Its API records of the conns go at close (they leaked until the proxy
    disconnected), and the daemon's connection records and TCBs go once
    both interfaces are SPLICED (``compacted``): memory per idle splice.
    The same when the daemon sends the reply and releases the conns itself
    (connect_splice with data and release), and the reply carries the bound
    address the client's bytes really leave from.
    """
    n = 20
    before = stats(tb)["splice_counters"]
    proxy = tb.host("proxy").popen(
        [
            sys.executable,
            "-c",
            RELEASING_PROXY,
            str(tb.daemon_socket),
            *map(str, tb.origin),
            str(n),
            reply,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdin is not None
        assert proxy.stdout.readline().strip() == "ready"
        out = run_py(tb.host("client"), RELEASED_CLIENTS, str(n), timeout=120)
        rows = [line.split() for line in out.splitlines()]
        assert [digest for digest, _ in rows] == [pattern_sha256(65536)] * n
        proxy.stdin.write("\n")
        proxy.stdin.flush()
        left, *bound = proxy.stdout.readline().split()
        assert left == "0"
        assert [b for _, b in rows] == bound  # what the proxy's connect_splice said
        assert all(b.startswith("198.51.100.2:") for b in bound)
        after = stats(tb)["splice_counters"]
        assert after["compacted"] - before["compacted"] == n
    finally:
        proxy.kill()
        proxy.wait()


# Splices one client, then asks for a second connection from the very 4-tuple
# the splice's server side uses: the daemon must refuse it.
SAME_TUPLE_PROXY = """
import sys
from daemon.api.client import SpliceClient, SpliceError
origin = (sys.argv[2], int(sys.argv[3]))
with SpliceClient(sys.argv[1]) as api:
    lst = api.listen(("198.51.100.1", 7022))
    print("ready", flush=True)
    cli = lst.accept()
    assert cli.recv(3) == b"GO\\n"
    srv = api.connect_splice(cli, origin, 3, timeout=10)
    cli.sendall(b"OK\\n")
    try:
        api.connect(origin, local=srv.local, timeout=3)
        print("connected", flush=True)
    except SpliceError as exc:
        print(exc.code, flush=True)
    sys.stdin.readline()
"""


def test_a_spliced_4_tuple_is_not_handed_out_again(tb: Testbed) -> None:
    """An explicit local port is checked against spliced flows too (they leave the daemon's
    own flow table at splice): the same 4-tuple twice would be two TCBs on one wire."""
    proxy = tb.host("proxy").popen(
        [sys.executable, "-c", SAME_TUPLE_PROXY, str(tb.daemon_socket), *map(str, tb.sink)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs = [proxy]
    try:
        assert proxy.stdout is not None and proxy.stdin is not None
        assert proxy.stdout.readline().strip() == "ready"
        procs.append(
            tb.host("client").popen(
                [
                    sys.executable,
                    "-c",
                    "import socket, sys\n"
                    "s = socket.create_connection(('198.51.100.1', 7022), timeout=10)\n"
                    "s.sendall(b'GO\\n')\n"
                    "assert s.recv(3) == b'OK\\n'\n"
                    "sys.stdin.readline()\n",
                ],
                stdin=subprocess.PIPE,
                text=True,
            )
        )
        assert proxy.stdout.readline().strip() == "EADDRINUSE"
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.close()
            p.kill()
            p.wait()
