"""ECN (RFC 3168) across a splice and at the daemon's own endpoint, against Linux peers.

The client-proxy link CE-marks instead of dropping (``loss=P% ecn``, as
netem's ``ecn``), so every congestion signal is a mark; captures on both
links show what each connection carried:

* both connections negotiated ECN: the server's data crosses the splice
  with its ECT codepoint, the link marks it CE on the client's side, the
  client's ECE reaches the server through the splice, and the server's CWR
  comes back; with the kernel fast path and without it;
* the client did not ask for ECN: nothing ECN-related crosses the splice
  (Not-ECT data, no ECE or CWR on either side after the handshake);
* the daemon as a sender and a receiver: its data is ECT(0), the client's
  ECE halves its window (``ecn_reductions``) and it answers with CWR; CE on
  the client's data is echoed with ECE until the client's CWR.

Every transfer is content-checked.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.net import Link, Testbed
from testbed.pcap import Frame, tcp_frames
from tests.helpers import curl_sha256, pattern_sha256

pytestmark = pytest.mark.root

SIZE = 8 << 20
ECE, CWR, SYN, ACK = 0x40, 0x80, 0x02, 0x10
NOT_ECT, ECT0, CE = 0, 2, 3


def counters_after(link: Link, when: float) -> dict[str, Any]:
    """The wire's counters as written after ``when`` (the impairment writes them every second)."""
    deadline = time.monotonic() + 5
    while True:
        counters: dict[str, Any] = link.shape_status()[1]
        if counters.get("time", 0) > when or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


@pytest.fixture
def client_ecn(spliced_tb: Testbed) -> Iterator[Testbed]:
    """The client asks for ECN (net.ipv4.tcp_ecn=1); the server's default 2 grants it."""
    client = spliced_tb.host("client")
    before = client.sysctl("net.ipv4.tcp_ecn")
    client.sysctl("net.ipv4.tcp_ecn", 1)
    try:
        yield spliced_tb
    finally:
        client.sysctl("net.ipv4.tcp_ecn", before)


def spliced_download(
    tb: Testbed, tmp_path: Path
) -> tuple[list[Frame], list[Frame], dict[str, Any]]:
    """8 MB through the spliced SOCKS5 over a marking client link: both links' frames.

    The client link is captured at the client's end, after the wire marked it.
    """
    cp_pcap, ps_pcap = tmp_path / "cp.pcap", tmp_path / "ps.pcap"
    link = tb.link("client-proxy")
    socks = "{}:{}".format(*tb.spliced_socks)
    url = f"http://{tb.origin[0]}:{tb.origin[1]}/bytes/{SIZE}"
    try:
        link.shape("loss=2% ecn seed=11")
        with (
            link.capture(cp_pcap, side="client", snaplen=96),  # past the marking wire
            tb.link("proxy-server").capture(ps_pcap, snaplen=96),
        ):
            rc, digest = curl_sha256(tb.host("client"), url, "--socks5", socks)
        counters = counters_after(link, time.time())
    finally:
        link.clear()
    assert rc == 0 and digest == pattern_sha256(SIZE)
    return tcp_frames(cp_pcap), tcp_frames(ps_pcap), counters


def test_ecn_crosses_a_splice_whose_two_connections_negotiated_it(
    client_ecn: Testbed, tmp_path: Path
) -> None:
    tb = client_ecn
    cp, ps, counters = spliced_download(tb, tmp_path)
    origin_port = tb.origin[1]
    marked = counters["b_to_a"]["marked"]  # toward the client: the data
    assert marked > 0
    # Each link's handshake negotiated ECN: ECE|CWR on the SYN, ECE alone on the SYN-ACK.
    for frames, server_port in ((cp, tb.spliced_socks[1]), (ps, origin_port)):
        syns = [f for f in frames if f.flags & (SYN | ACK) == SYN and f.dport == server_port]
        synacks = [f for f in frames if f.flags & (SYN | ACK) == SYN | ACK]
        assert syns and all(f.flags & (ECE | CWR) == ECE | CWR for f in syns)
        assert synacks and all(f.flags & (ECE | CWR) == ECE for f in synacks)
    # The server's data: ECT(0) on its own link (at most a retransmission is Not-ECT) ...
    server_data = [f for f in ps if f.sport == origin_port and f.payload_len]
    assert sum(f.ecn == ECT0 for f in server_data) > 0.9 * len(server_data)
    assert not any(f.ecn == CE for f in server_data)  # nothing marks that link
    # ... relayed with it, and marked on the client's link.
    to_client = [f for f in cp if f.sport == tb.spliced_socks[1] and f.payload_len > 100]
    assert sum(f.ecn == CE for f in to_client) >= marked // 2  # snaplen: every frame is seen
    assert sum(f.ecn == ECT0 for f in to_client) > 0.9 * (len(to_client) - marked)
    # The client's echo crosses the splice to the server, and the server's CWR comes back.
    echoes_out = sum(1 for f in cp if f.dport == tb.spliced_socks[1] and f.flags & ECE)
    echoes_in = sum(1 for f in ps if f.dport == origin_port and f.flags & ECE and f.flags & ACK)
    cwr_in = sum(1 for f in ps if f.sport == origin_port and f.flags & CWR)
    cwr_out = sum(1 for f in cp if f.sport == tb.spliced_socks[1] and f.flags & CWR)
    assert echoes_out > 0 and echoes_in > 0
    assert cwr_in > 0 and cwr_out > 0


def test_a_client_without_ecn_gets_no_ecn_across_the_splice(
    spliced_tb: Testbed, tmp_path: Path
) -> None:
    tb = spliced_tb
    client = tb.host("client")
    before = client.sysctl("net.ipv4.tcp_ecn")
    client.sysctl("net.ipv4.tcp_ecn", 0)
    try:
        cp, ps, counters = spliced_download(tb, tmp_path)
    finally:
        client.sysctl("net.ipv4.tcp_ecn", before)
    origin_port = tb.origin[1]
    # The server link negotiated it (the daemon asks, the origin grants) ...
    synacks = [f for f in ps if f.flags & (SYN | ACK) == SYN | ACK and f.sport == origin_port]
    assert synacks and all(f.flags & ECE for f in synacks)
    assert any(f.ecn == ECT0 for f in ps if f.sport == origin_port and f.payload_len)
    # ... the client link did not, so nothing of it reaches the client, and the
    # link drops where it would have marked.
    assert all(f.ecn == NOT_ECT for f in cp), "an ECN codepoint on the non-ECN connection"
    assert not any(f.flags & (ECE | CWR) for f in cp if not f.flags & SYN)
    assert counters["b_to_a"]["marked"] == 0 and counters["b_to_a"]["dropped"] > 0
    # No echo toward the server after its handshake.
    assert not any(f.flags & ECE for f in ps if f.dport == origin_port and not f.flags & SYN)


ENDPOINT = """
import json, sys
from daemon.api.client import SpliceClient
sock, addr, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = bytes(range(256)) * (size // 256)
with SpliceClient(sock) as api:
    lst = api.listen((addr, port))
    print("ready", flush=True)
    conn = lst.accept(timeout=60)
    got = bytearray()
    while len(got) < size // 2:
        chunk = conn.recv(1 << 16)
        assert chunk, "EOF before the upload ended"
        got += chunk
    assert bytes(got) == data[: size // 2]  # the upload, intact
    conn.sendall(data)
    assert conn.recv(1) == b"k"  # the client has every byte
    print(json.dumps(api.stats(conn)), flush=True)
    conn.close()
"""

CLIENT = """
import hashlib, socket, sys
addr, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes(range(256)) * (size // 256)
s = socket.create_connection((addr, port), timeout=60)
s.sendall(data[: size // 2])
h, got = hashlib.sha256(), 0
while got < size:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk)
    got += len(chunk)
s.sendall(b"k")
print(got, h.hexdigest(), flush=True)
"""


def test_the_daemons_own_connection_marks_echoes_and_reduces(
    client_ecn: Testbed, tmp_path: Path
) -> None:
    tb = client_ecn
    if tb.fastpath != "off":
        pytest.skip("no splice here: one run is enough")
    link = tb.link("client-proxy")
    addr, port = "198.51.100.1", 8098
    pcap = tmp_path / "cp.pcap"
    sender = None
    try:
        link.shape("loss=2% ecn seed=12")
        with link.capture(pcap, side="client", snaplen=96):
            sender = tb.host("proxy").popen(
                [sys.executable, "-c", ENDPOINT, str(tb.daemon_socket), addr, str(port), str(SIZE)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
            out = tb.host("client").cmd(
                [sys.executable, "-c", CLIENT, addr, str(port), str(SIZE)], timeout=300
            )
            stats = json.loads(sender.stdout.readline())
            sender.wait(timeout=30)
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait()
        link.clear()
    got, digest = out.stdout.split()
    want = hashlib.sha256(bytes(range(256)) * (SIZE // 256)).hexdigest()
    assert int(got) == SIZE and digest == want
    assert stats["options"]["ecn"] is True
    # Receiving: the client's data was marked; the daemon echoed, the client answered CWR.
    assert stats["ecn_ce_received"] > 0
    # Sending: the client echoed the marks on the daemon's data; it halved, and said so.
    assert stats["ecn_reductions"] > 0
    frames = tcp_frames(pcap)
    ours = [f for f in frames if f.sport == port]
    theirs = [f for f in frames if f.dport == port]
    assert any(f.flags & ECE for f in ours) and any(f.flags & CWR for f in theirs)
    assert any(f.flags & ECE for f in theirs) and any(f.flags & CWR for f in ours)
    data = [f for f in ours if f.payload_len]
    assert sum(f.ecn in (ECT0, CE) for f in data) > 0.9 * len(data)
    assert not any(f.ecn for f in ours if not f.payload_len)  # pure ACKs are Not-ECT
