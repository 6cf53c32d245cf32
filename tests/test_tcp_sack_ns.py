"""The daemon's own sending recovers from loss with SACK (RFC 6675), against Linux.

A proxy-side script sends 8 MB from a daemon connection to a client in
the client namespace over a client-proxy link that drops 3% of packets;
the client (Linux TCP, SACK on) checks the content.  The daemon's
counters for the connection show RFC 6675 recovery: episodes, and holes
resent from the scoreboard beyond the first segment (NextSeg rule 1),
which NewReno never does (tests/test_tcp_sack.py has the exact rules).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from testbed.net import Testbed

pytestmark = pytest.mark.root

PORT = 8099
SIZE = 8 << 20

SENDER = """
import json, sys
from daemon.api.client import SpliceClient
sock, addr, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = bytes(range(256)) * (size // 256)
with SpliceClient(sock) as api:
    lst = api.listen((addr, port))
    print("ready", flush=True)
    conn = lst.accept(timeout=60)
    conn.sendall(data)
    assert conn.recv(1) == b"k"  # the client has every byte
    print(json.dumps(api.stats(conn)), flush=True)
    conn.close()
"""

RECEIVER = """
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
h, got, size = hashlib.sha256(), 0, int(sys.argv[3])
while got < size:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk)
    got += len(chunk)
s.sendall(b"k")
print(got, h.hexdigest(), flush=True)
"""


def test_a_lossy_download_is_recovered_with_sack_and_arrives_intact(tb: Testbed) -> None:
    link = tb.link("client-proxy")
    addr = "198.51.100.1"
    sender = None
    try:
        link.shape("loss=3% seed=5")
        sender = tb.host("proxy").popen(
            [sys.executable, "-c", SENDER, str(tb.daemon_socket), addr, str(PORT), str(SIZE)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
        out = tb.host("client").cmd(
            [sys.executable, "-c", RECEIVER, addr, str(PORT), str(SIZE)], timeout=300
        )
        stats = json.loads(sender.stdout.readline())
        sender.wait(timeout=30)
        counters = link.shape_status()[1]
        dropped = sum(counters[d]["dropped"] for d in ("a_to_b", "b_to_a"))
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait()
        link.clear()
    want = hashlib.sha256(bytes(range(256)) * (SIZE // 256)).hexdigest()
    assert out.stdout.split() == [str(SIZE), want], out.stderr
    assert dropped > 0
    assert stats["options"]["sack"] is True
    assert stats["sack_recoveries"] >= 1 and stats["sack_retransmits"] >= 1, stats
    # Tail loss probes stand in for most RTOs (lost ACKs of a whole flight).
    assert stats["tlp_probes"] >= 1, stats
