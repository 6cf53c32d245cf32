"""Transfers across the testbed with the kernel's own TCP at both ends.

Router path (the proxy namespace forwards) and plain SOCKS5 path, with curl
as a real client and with our load client; content is always checked.  The
testbed is dual-stack: the paths are checked over IPv6 too, and the plain
SOCKS5 joins the two families (copying, as any proxy can).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from servers.address import format_host_port
from testbed.net import Testbed
from testbed.pcap import tcp_frames
from tests.helpers import (
    connect_request,
    curl_sha256,
    half_close_through_socks,
    loadgen,
    pattern_sha256,
    run_py,
    socks_reply_code,
)

pytestmark = pytest.mark.root

SIZES = [1024, 1 << 20, 64 << 20]
FAMILIES = [4, 6]


def origin_of(tb: Testbed, family: int) -> tuple[str, int]:
    return tb.origin6 if family == 6 else tb.origin


def socks_of(tb: Testbed, family: int) -> tuple[str, int]:
    return tb.socks6 if family == 6 else tb.socks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_router_path_delivers_intact_with_curl(testbed: Testbed, size: int, family: int) -> None:
    url = f"http://{format_host_port(*origin_of(testbed, family))}/bytes/{size}"
    rc, digest = curl_sha256(testbed.host("client"), url, f"-{family}")
    assert rc == 0 and digest == pattern_sha256(size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_socks5_path_delivers_intact_with_curl(testbed: Testbed, size: int, family: int) -> None:
    url = f"http://{format_host_port(*origin_of(testbed, family))}/bytes/{size}"
    socks = format_host_port(*socks_of(testbed, family))
    rc, digest = curl_sha256(testbed.host("client"), url, "--socks5", socks)
    assert rc == 0 and digest == pattern_sha256(size)


@pytest.mark.parametrize(("client_family", "server_family"), [(4, 6), (6, 4)])
def test_socks5_joins_the_two_families(
    testbed: Testbed, client_family: int, server_family: int
) -> None:
    """A copying proxy joins an IPv4 client to an IPv6 server (and back): the baseline
    for splicing across families (issue: a splice must rebuild the IP header)."""
    size = 8 << 20
    url = f"http://{format_host_port(*origin_of(testbed, server_family))}/bytes/{size}"
    socks = format_host_port(*socks_of(testbed, client_family))
    rc, digest = curl_sha256(testbed.host("client"), url, "--socks5", socks)
    assert rc == 0 and digest == pattern_sha256(size)


def test_rounds_of_100_concurrent_ipv6_transfers_through_socks5(testbed: Testbed) -> None:
    for _ in range(3):
        results = loadgen(
            testbed.host("client"),
            "--server",
            format_host_port(*testbed.origin6),
            "--size",
            "64K",
            "--socks5",
            format_host_port(*testbed.socks6),
            "--concurrency",
            "100",
        )
        failed = [r for r in results if not r["ok"]]
        assert len(results) == 100 and failed == [], failed[:3]


def test_status_names_both_families(testbed: Testbed) -> None:
    hosts = testbed.status()["hosts"]
    assert hosts["client"]["addresses6"] == ["2001:db8:c::2"]
    assert hosts["proxy"]["addresses6"] == ["2001:db8:c::1", "2001:db8:5::1"]
    assert hosts["server"]["addresses"] == ["203.0.113.2"]
    assert hosts["server"]["addresses6"] == ["2001:db8:5::2"]


def test_our_client_direct_and_through_socks5(testbed: Testbed) -> None:
    ip, port = testbed.origin
    sx, sp = testbed.socks
    sizes = [str(s) for s in SIZES]
    for extra in ([], ["--socks5", f"{sx}:{sp}"]):
        args = ["--server", f"{ip}:{port}", *[a for s in sizes for a in ("--size", s)], *extra]
        results = loadgen(testbed.host("client"), *args)
        assert sorted(r["size"] for r in results) == sorted(SIZES)
        assert all(r["ok"] and r["error"] is None and r["bytes"] == r["size"] for r in results)
        assert all(r["response_time_s"] > 0 for r in results)


def test_concurrent_workers_through_socks5(testbed: Testbed) -> None:
    ip, port = testbed.origin
    sx, sp = testbed.socks
    results = loadgen(
        testbed.host("client"),
        "--server",
        f"{ip}:{port}",
        "--size",
        "1M",
        "--socks5",
        f"{sx}:{sp}",
        "--concurrency",
        "4",
        "--repeat",
        "3",
    )
    assert len(results) == 12 and all(r["ok"] for r in results)
    assert len({r["worker"] for r in results}) == 4


def test_upload_through_socks5_is_checked_by_the_sink(testbed: Testbed) -> None:
    ip, port = testbed.origin
    sx, sp = testbed.socks
    results = loadgen(
        testbed.host("client"),
        "--server",
        f"{ip}:{port}",
        "--size",
        "8M",
        "--socks5",
        f"{sx}:{sp}",
        "--upload",
    )
    assert len(results) == 1 and results[0]["ok"], results
    # And with curl: the sink's answer is the SHA-256 of what it received.
    out = run_py(
        testbed.host("client"),
        """
        import hashlib, os, subprocess, sys
        body = os.urandom(3 << 20)
        with open("/tmp/upload-" + sys.argv[1], "wb") as f:
            f.write(body)
        res = subprocess.run(["curl", "-sS", "--socks5", sys.argv[2], "--data-binary",
                              "@/tmp/upload-" + sys.argv[1], sys.argv[3]],
                             capture_output=True, text=True)
        os.unlink("/tmp/upload-" + sys.argv[1])
        print(res.returncode, hashlib.sha256(body).hexdigest() in res.stdout)
        """,
        testbed.prefix,
        f"{sx}:{sp}",
        f"http://{ip}:{port}/sink",
    )
    assert out.split() == ["0", "True"]


def test_half_close_through_socks5_delivers_the_answer(testbed: Testbed) -> None:
    """Client sends, then shuts down writing; the sink's answer still arrives."""
    assert half_close_through_socks(testbed.host("client"), testbed.socks, testbed.sink, 5 << 20)


def test_socks5_failures_map_to_reply_codes(testbed: Testbed) -> None:
    client, socks = testbed.host("client"), testbed.socks
    server_ip = testbed.origin[0]
    # Nothing listens on port 81 of the server: its kernel answers RST.
    assert socks_reply_code(client, socks, connect_request(server_ip, 81)) == 0x05
    # The proxy has no IPv6 route at all: 2001:db8::/32 is unreachable as a network.
    v6 = bytes([5, 1, 0, 4]) + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + bytes([0, 80])
    assert socks_reply_code(client, socks, v6) == 0x03
    # No host owns 203.0.113.99: ARP fails, the proxy's kernel says EHOSTUNREACH.
    assert socks_reply_code(client, socks, connect_request("203.0.113.99", 80)) == 0x04
    # BIND (cmd 2) is not supported; an unknown address type is rejected.
    assert socks_reply_code(client, socks, connect_request(server_ip, 80, cmd=2)) == 0x07
    assert socks_reply_code(client, socks, bytes([5, 1, 0, 9, 1, 2, 3, 4, 0, 80])) == 0x08
    # ... and the proxy keeps serving.
    ip, port = testbed.origin
    rc, digest = curl_sha256(
        client, f"http://{ip}:{port}/bytes/1000", "--socks5", f"{socks[0]}:{socks[1]}"
    )
    assert rc == 0 and digest == pattern_sha256(1000)


def test_socks5_connect_timeout_maps_to_0x06(testbed: Testbed) -> None:
    server, proxy = testbed.host("server"), testbed.host("proxy")
    rule = ["-p", "tcp", "--dport", "82", "-j", "DROP"]
    server.cmd(["iptables", "-w", "-A", "INPUT", *rule], check=True)
    quick = proxy.popen(
        [
            sys.executable,
            "-m",
            "proxies.socks5",
            "--listen",
            "192.0.2.1:1083",
            "--connect-timeout",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert quick.stdout is not None and quick.stdout.readline().strip() == b"ready"
        code = socks_reply_code(
            testbed.host("client"), ("192.0.2.1", 1083), connect_request(testbed.origin[0], 82)
        )
        assert code == 0x06
    finally:
        quick.terminate()
        quick.wait(10)
        server.cmd(["iptables", "-w", "-D", "INPUT", *rule])


def test_curl_sees_the_socks5_refusal(testbed: Testbed) -> None:
    sx, sp = testbed.socks
    res = testbed.host("client").cmd(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--socks5",
            f"{sx}:{sp}",
            f"http://{testbed.origin[0]}:81/",
        ]
    )
    assert res.returncode == 97  # curl: "proxy handshake error"
    assert "(5)" in res.stderr  # curl names the SOCKS reply code: 5, connection refused


def test_transfers_stay_intact_with_loss_and_delay_mid_path(testbed: Testbed) -> None:
    links = [testbed.link("client-proxy"), testbed.link("proxy-server")]
    ip, port = testbed.origin
    sx, sp = testbed.socks
    try:
        for link in links:
            link.shape("delay=10ms loss=1%")
        for extra in ([], ["--socks5", f"{sx}:{sp}"]):
            for size in (1 << 20, 8 << 20):
                rc, digest = curl_sha256(
                    testbed.host("client"), f"http://{ip}:{port}/bytes/{size}", *extra
                )
                assert rc == 0 and digest == pattern_sha256(size), (extra, size)
        counters = [link.shape_status()[1] for link in links]
    finally:
        for link in links:
            link.clear()
    # The impairment really happened: packets were held and some were dropped.
    dropped = sum(c[d]["dropped"] for c in counters for d in ("a_to_b", "b_to_a"))
    delayed = sum(c[d]["delayed"] for c in counters for d in ("a_to_b", "b_to_a"))
    assert dropped > 0 and delayed > 1000


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_of_a_link_holds_the_handshake(
    testbed: Testbed, tmp_path: Path, family: int
) -> None:
    pcap = tmp_path / "cp.pcap"
    origin = origin_of(testbed, family)
    with testbed.link("client-proxy").capture(pcap, snaplen=128):
        rc, _ = curl_sha256(
            testbed.host("client"), f"http://{format_host_port(*origin)}/bytes/2000"
        )
        assert rc == 0
    syns = [
        f for f in tcp_frames(pcap) if f.version == family and f.dport == origin[1] and f.flags & 2
    ]
    assert syns, f"no IPv{family} SYN toward the origin in the capture"
