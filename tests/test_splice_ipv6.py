"""IPv6 splices and splices across families, against Linux peers, through the spliced SOCKS5.

The relay splices an IPv6 connection by giving its segments an IPv4-shaped
header inside and their IPv6 header back on the way out
(daemon/splice/family.py); each side converts on its own, so an IPv4
client can be spliced to an IPv6 server and the reverse.  Once both sides
relay, the kernel fast path takes the steady state over in either family
and across them (the tc program changes the header's family, and lowers
a GSO packet's segment size where the IPv6 side's MSS is the smaller).
Every test runs twice: with the fast path, and with the Python relay
alone.  Content is checked by hash; captures show each link in its own
family with every segment within that link's MTU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from servers.address import format_host_port
from testbed.net import Testbed
from testbed.pcap import tcp_frames
from tests.helpers import (
    concurrent_rounds,
    curl_sha256,
    daemon_stats,
    loadgen,
    pattern_sha256,
    upload_intact,
)
from tests.test_pmtu_ns import UPLOAD, run_shrinking

pytestmark = pytest.mark.root


def ends(tb: Testbed, client: int, server: int) -> tuple[str, str]:
    """(SOCKS5 address, origin URL prefix) for a client family and a server family."""
    socks = tb.spliced_socks6 if client == 6 else tb.spliced_socks
    origin = tb.origin6 if server == 6 else tb.origin
    return format_host_port(*socks), f"http://{format_host_port(*origin)}"


FAMILIES = [(6, 6), (4, 6), (6, 4)]


@pytest.fixture(scope="module")
def tb(spliced_tb: Testbed) -> Testbed:
    """The testbed once with the kernel fast path, once with the Python relay alone."""
    return spliced_tb


def kernel_counters(tb: Testbed) -> dict[str, int]:
    counters: dict[str, int] = daemon_stats(tb).get("fast_path", {}).get("counters", {})
    return counters


@pytest.mark.parametrize(("client", "server"), FAMILIES)
@pytest.mark.parametrize("size", [1024, 1 << 20, 64 << 20])
def test_curl_through_the_spliced_socks5(tb: Testbed, client: int, server: int, size: int) -> None:
    socks, origin = ends(tb, client, server)
    before, kernel_before = daemon_stats(tb)["splice_counters"], kernel_counters(tb)
    rc, digest = curl_sha256(tb.host("client"), f"{origin}/bytes/{size}", "--socks5", socks)
    assert rc == 0 and digest == pattern_sha256(size)
    after, kernel_after = daemon_stats(tb)["splice_counters"], kernel_counters(tb)
    assert after["spliced"] > before["spliced"], (before, after)
    if tb.fastpath == "on" and size >= 64 << 20:
        # The bulk of it crossed in the kernel, in its own family on each side.
        moved = {k: kernel_after[k] - kernel_before.get(k, 0) for k in kernel_after}
        assert moved["redirected_bytes"] >= size // 2, moved
        if client != server:
            assert moved["redirected_family_changed"] >= moved["redirected_packets"] // 2, moved
        assert moved["dropped_rewrite_failed"] == 0, moved


@pytest.mark.parametrize(("client", "server"), FAMILIES)
def test_an_upload_is_spliced_intact(tb: Testbed, client: int, server: int) -> None:
    socks, origin = ends(tb, client, server)
    upload_intact(tb.host("client"), origin.removeprefix("http://"), socks)


def test_an_ipv4_clients_segments_are_recut_in_the_kernel_for_an_ipv6_server(
    tb: Testbed,
) -> None:
    """The IPv4 client was offered MSS 1460 before anyone knew the server's family; the
    IPv6 server's MSS is 20 bytes smaller.  The tc program lowers each GSO packet's
    segment size to it (``gso_recut``) instead of punting it to be cut in Python.  A
    full-size segment that arrives alone (not GSO: a retransmission, a lone segment
    at the start) cannot be made GSO at tc (``gso_size`` is read-only there) and is
    still cut in Python (``punt_mss``): 2-27 per 32 MB here, against ~600 recut."""
    if tb.fastpath != "on":
        pytest.skip("the kernel fast path's behaviour")
    socks, origin = ends(tb, 4, 6)
    before = kernel_counters(tb)
    results = loadgen(
        tb.host("client"), "--server", origin.removeprefix("http://"), "--size", "32M",
        "--socks5", socks, "--upload",
    )  # fmt: skip
    assert len(results) == 1 and results[0]["ok"], results
    after = kernel_counters(tb)
    moved = {k: after[k] - before.get(k, 0) for k in after}
    assert moved["gso_recut"] > 0, moved
    assert moved["redirected_bytes"] >= 16 << 20, moved
    assert moved["punt_mss"] * 10 <= moved["gso_recut"], moved
    assert moved["dropped_rewrite_failed"] == 0, moved


def test_rounds_of_100_concurrent_ipv6_splices(tb: Testbed) -> None:
    socks, origin = ends(tb, 6, 6)
    concurrent_rounds(tb.host("client"), origin.removeprefix("http://"), socks, "64K")


def test_each_link_carries_its_own_family_and_an_mss_that_fits_it(
    tb: Testbed, tmp_path: Path
) -> None:
    """IPv4 client, IPv6 server: IPv4 frames only on the client link, IPv6 only toward the
    server, and the daemon's SYN to the server offers no more than IPv6's 1440 (the
    client's 1460 would not fit a 1500-byte link in IPv6)."""
    socks, origin = ends(tb, 4, 6)
    cp, ps = tmp_path / "cp.pcap", tmp_path / "ps.pcap"
    with (
        tb.link("client-proxy").capture(cp, side="client", snaplen=128),
        tb.link("proxy-server").capture(ps, side="server", snaplen=128),
    ):
        rc, digest = curl_sha256(tb.host("client"), f"{origin}/bytes/{8 << 20}", "--socks5", socks)
    assert rc == 0 and digest == pattern_sha256(8 << 20)
    client_side, server_side = tcp_frames(cp), tcp_frames(ps)
    assert client_side and {f.version for f in client_side} == {4}
    assert server_side and {f.version for f in server_side} == {6}
    syn_mss = [f.mss for f in server_side if f.flags & 0x12 == 0x02]
    assert syn_mss and all(m is not None and m <= 1440 for m in syn_mss), syn_mss


def test_every_ipv6_connection_carries_its_own_flow_label(tb: Testbed, tmp_path: Path) -> None:
    """RFC 6437: the daemon labels each of its IPv6 connections (endpoint and spliced, in
    Python and in the kernel fast path alike) with one non-zero label for all its segments;
    two connections get two labels."""
    socks, origin = ends(tb, 6, 6)
    cp, ps = tmp_path / "cp.pcap", tmp_path / "ps.pcap"
    with (
        tb.link("client-proxy").capture(cp, side="client", snaplen=96),
        tb.link("proxy-server").capture(ps, side="server", snaplen=96),
    ):
        for _ in range(2):
            rc, digest = curl_sha256(
                tb.host("client"), f"{origin}/bytes/{8 << 20}", "--socks5", socks
            )
            assert rc == 0 and digest == pattern_sha256(8 << 20)
    daemon_addrs = {bytes.fromhex("20010db8000d" + "0" * 19 + n) for n in ("1", "2")}
    for path in (cp, ps):
        by_conn: dict[tuple[bytes, int, bytes, int], set[int]] = {}
        for f in tcp_frames(path):
            if f.version == 6 and f.src in daemon_addrs:
                by_conn.setdefault((f.src, f.sport, f.dst, f.dport), set()).add(f.flow_label)
        assert len(by_conn) == 2, (path.name, by_conn)
        labels = [next(iter(s)) for s in by_conn.values()]
        assert all(len(s) == 1 for s in by_conn.values()), (path.name, by_conn)
        assert 0 not in labels and labels[0] != labels[1], (path.name, labels)


@pytest.mark.parametrize("proxy", ["http_proxy", "http11_proxy"])
@pytest.mark.parametrize(("client", "server"), FAMILIES)
@pytest.mark.parametrize("size", [1024, 8 << 20])
def test_the_http_proxies_with_ipv6_literals(
    tb: Testbed, proxy: str, client: int, server: int, size: int
) -> None:
    """curl -x to either spliced HTTP proxy, each family on each side, [v6] URL literals."""
    host, port = getattr(tb, proxy)
    proxy_url = f"http://[2001:db8:d::1]:{port}" if client == 6 else f"http://{host}:{port}"
    origin = tb.origin6 if server == 6 else tb.origin
    url = f"http://{format_host_port(*origin)}/bytes/{size}"
    rc, digest = curl_sha256(tb.host("client"), url, "-x", proxy_url)
    assert rc == 0 and digest == pattern_sha256(size)


@pytest.mark.parametrize(
    ("client", "server", "link_mtu", "client_mtu"),
    [
        (6, 6, 1280, 1280),  # ICMPv6 Packet Too Big, as the router's
        (4, 6, 1280, 1260),  # the IPv4 client's packets are 20 bytes shorter
        (6, 4, 1300, 1320),  # and the IPv6 client's 20 bytes longer
    ],
)
def test_a_shrinking_server_link_is_told_to_the_client_in_its_own_family(
    tb: Testbed, client: int, server: int, link_mtu: int, client_mtu: int
) -> None:
    """RFC 1191 / RFC 8201 for IPv6 and cross-family splices: the client hears of the
    server link's MTU in its own family's ICMP, corrected for the header difference."""
    socks = tb.spliced_socks6 if client == 6 else tb.spliced_socks
    sink = tb.sink6 if server == 6 else tb.sink
    args = [*map(str, socks), *map(str, sink)]
    out, moved = run_shrinking(tb, "proxy-server", UPLOAD, args, "spliced", mtu=link_mtu)
    _, mss_before, verdict, mss_after = out
    headers = (60 if client == 6 else 40) + 12  # IP and TCP headers, the TS option
    assert int(mss_before) > client_mtu - headers
    assert verdict == "ok"
    assert int(mss_after) <= client_mtu - headers
    assert moved["icmp_frag_needed_relayed"] >= 1


@pytest.mark.parametrize(
    ("client", "name", "family"),
    [(6, "origin6.test", 6), (6, "origin4.test", 4), (4, "origin6.test", 6)],
)
def test_curl_socks5_hostname_resolves_in_the_proxy(
    tb: Testbed, tmp_path: Path, client: int, name: str, family: int
) -> None:
    """``curl --socks5-hostname``: the name goes to the proxy, which resolves it (the
    testbed's hosts file, testbed/netns.py) and splices to that address's family."""
    socks = tb.spliced_socks6 if client == 6 else tb.spliced_socks
    size = 8 << 20
    ps = tmp_path / "ps.pcap"
    with tb.link("proxy-server").capture(ps, side="server", snaplen=96):
        rc, digest = curl_sha256(
            tb.host("client"),
            f"http://{name}/bytes/{size}",
            f"-{client}",
            "--socks5-hostname",
            format_host_port(*socks),
        )
    assert rc == 0 and digest == pattern_sha256(size)
    toward_origin = [f for f in tcp_frames(ps) if f.dport == tb.origin[1]]
    assert toward_origin and {f.version for f in toward_origin} == {family}


def test_the_http_proxy_resolves_a_name_of_either_family(tb: Testbed) -> None:
    host, port = tb.http_proxy
    for name in ("origin.test", "origin4.test", "origin6.test"):
        url = f"http://{name}/bytes/{1 << 20}"
        rc, digest = curl_sha256(tb.host("client"), url, "-x", f"http://{host}:{port}")
        assert rc == 0 and digest == pattern_sha256(1 << 20), name


def test_the_names_are_the_testbeds_own_and_the_machines_hosts_file_is_untouched(
    tb: Testbed,
) -> None:
    out = tb.host("proxy").cmd(["getent", "ahostsv6", "origin6.test"], check=True).stdout
    assert tb.origin6[0] in out
    out = tb.host("client").cmd(["getent", "hosts", "origin4.test"], check=True).stdout
    assert tb.origin[0] in out
    assert "origin.test" not in Path("/etc/hosts").read_text()


def test_curl_socks5_hostname_with_an_ipv6_literal(tb: Testbed) -> None:
    """``curl -6 --socks5-hostname``: the proxy, not curl, takes the host (here a literal)."""
    socks, origin = ends(tb, 6, 6)
    rc, digest = curl_sha256(
        tb.host("client"), f"{origin}/bytes/{1 << 20}", "-6", "--socks5-hostname", socks
    )
    assert rc == 0 and digest == pattern_sha256(1 << 20)
