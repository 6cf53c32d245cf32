"""A SYN flood on the spliced SOCKS5's listener while real clients connect (RFC 4987).

A raw socket in the client namespace sends SYNs from spoofed, silent
sources (192.0.2.128/25: nobody answers the daemon's SYN-ACKs) to
198.51.100.1:1080 at 20,000 per second.  They fill the listener's
SYN-RECEIVED queue within milliseconds and keep it full; from then on the
daemon answers SYNs with SYN cookies (daemon/tcp/syncookie.py).  Real
clients (curl through the spliced SOCKS5, content-checked) must all be
served during the flood and right after it, while the half-open entries of
the flood are still retransmitting, and the daemon's memory must stay flat.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from testbed.net import Testbed
from tests.helpers import curl_sha256, daemon_stats, pattern_sha256

pytestmark = pytest.mark.root

RATE = 20_000  # SYN/s
FLOOD_SECONDS = 8.0

# Precomputed SYNs (correct checksums, as a real flood's are) from 127
# spoofed addresses and many ports, sent in a paced loop.
FLOODER = r"""
import os, random, socket, struct, sys, time
dst, dport, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
daddr = socket.inet_aton(dst)
rng = random.Random(4987)
packets = []
for i in range(8192):
    saddr = bytes([192, 0, 2, 128 + rng.randrange(127)])
    sport = rng.randrange(1024, 65535)
    opts = struct.pack("!BBH", 2, 4, 1460)  # MSS, as any SYN has
    isn = rng.getrandbits(32)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, isn, 0, 6 << 4, 0x02, 64240, 0, 0) + opts
    c = csum(saddr + daddr + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0, 64, 6, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    packets.append(ip + tcp)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
print("ready", flush=True)
sent, start, batch = 0, time.monotonic(), 200
end = start + seconds
while (now := time.monotonic()) < end:
    due = int((now - start) * rate)
    while sent < due:
        for _ in range(batch):
            try:
                s.sendto(packets[sent % len(packets)], (dst, 0))
            except OSError:
                pass
            sent += 1
    time.sleep(batch / rate / 2)
print(sent / (time.monotonic() - start), flush=True)
"""


def _real_requests(tb: Testbed, count: int, every: float) -> list[str]:
    """``count`` 1 KB requests through the spliced SOCKS5, one every ``every`` s: failures."""
    failures = []
    url = "http://{}:{}/bytes/1024".format(*tb.origin)
    proxy = "{}:{}".format(*tb.spliced_socks)
    for i in range(count):
        t0 = time.monotonic()
        rc, digest = curl_sha256(
            tb.host("client"), url, "--socks5", proxy, "--max-time", "5", timeout=30
        )
        if rc != 0 or digest != pattern_sha256(1024):
            failures.append(f"request {i}: curl exit {rc}")
        time.sleep(max(0.0, every - (time.monotonic() - t0)))
    return failures


def _daemon_rss(tb: Testbed) -> int:
    pid = tb.status()["services"]["daemon"]["pid"]
    return int(psutil.Process(pid).memory_info().rss)


def test_real_clients_are_served_during_and_after_a_syn_flood(spliced_tb: Testbed) -> None:
    tb = spliced_tb
    assert _real_requests(tb, 3, 0.0) == []  # warm: the proxy is there
    rss_before = _daemon_rss(tb)
    before: dict[str, Any] = daemon_stats(tb)["counters"]
    flood = tb.host("client").popen(
        [
            sys.executable,
            "-c",
            FLOODER,
            tb.spliced_socks[0],
            str(tb.spliced_socks[1]),
            str(RATE),
            str(FLOOD_SECONDS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flood.stdout is not None and flood.stdout.readline().strip() == "ready"
        # The SYN-RECEIVED queue is full once cookies go out: the siege is on.
        deadline = time.monotonic() + 10
        while daemon_stats(tb)["counters"]["syn_cookies_sent"] == before["syn_cookies_sent"]:
            assert time.monotonic() < deadline, "the flood never filled the SYN queue"
            time.sleep(0.05)
        during = _real_requests(tb, 25, 0.2)
        out, _ = flood.communicate(timeout=FLOOD_SECONDS + 30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    rate = float(out.strip().splitlines()[-1])
    # The flood's half-open entries retransmit their SYN-ACKs for minutes:
    # real clients must not wait for them to expire.
    after = _real_requests(tb, 20, 0.1)
    counters: dict[str, Any] = daemon_stats(tb)["counters"]
    rss_after = _daemon_rss(tb)
    cookies = counters["syn_cookies_sent"] - before["syn_cookies_sent"]
    print(
        f"flood {rate:.0f} SYN/s for {FLOOD_SECONDS} s: {cookies} cookies sent,"
        f" {counters['syn_cookies_accepted'] - before['syn_cookies_accepted']} accepted,"
        f" daemon RSS {rss_before >> 20} -> {rss_after >> 20} MiB"
    )
    assert rate >= 0.9 * RATE, f"the flood reached only {rate:.0f} SYN/s"
    assert during == [] and after == []
    assert cookies >= 0.5 * RATE * FLOOD_SECONDS * 0.5, counters  # most SYNs got one
    assert counters["syn_cookies_accepted"] > before["syn_cookies_accepted"]  # real clients
    # Nothing is kept per cookie: 80,000 SYNs may not cost the daemon more
    # than its SYN-RECEIVED queue (256 connections) and some slack.
    assert rss_after - rss_before < 32 << 20, (rss_before, rss_after)
