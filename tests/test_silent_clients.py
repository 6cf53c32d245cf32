"""Clients that connect and never speak, a thousand of them, while real clients are served.

Each silent client costs the daemon a TCB and the spliced SOCKS5 a thread
until its handshake timeout; both must stay bounded: real clients get
through during the siege, and every silent connection is closed by the
proxy once its timeout passes, after which the daemon holds no more
connections than before.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from testbed.net import Testbed
from tests.helpers import curl_sha256, daemon_stats, pattern_sha256

pytestmark = pytest.mark.root

SILENT = 1000
TIMEOUT = 3.0
PORT = 7031

SIEGE = r"""
import resource, selectors, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
addr, n, wait = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), float(sys.argv[4])
with ThreadPoolExecutor(64) as pool:
    socks = list(pool.map(lambda _: socket.create_connection(addr, timeout=10), range(n)))
print("open", flush=True)
sel = selectors.DefaultSelector()
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
closed, deadline = 0, time.monotonic() + wait
while closed < n and time.monotonic() < deadline:
    for key, _ in sel.select(0.5):
        try:
            data = key.fileobj.recv(64)
        except OSError:
            data = b""
        if not data:  # EOF or reset: the proxy let go of us
            sel.unregister(key.fileobj)
            key.fileobj.close()
            closed += 1
print(closed, flush=True)
"""


def test_a_thousand_silent_clients_are_timed_out_and_do_not_starve_real_ones(
    tb: Testbed,
) -> None:
    proxy = tb.host("proxy").popen(
        [
            sys.executable,
            "-m",
            "proxies.socks5_spliced",
            "--daemon",
            str(tb.daemon_socket),
            "--listen",
            f"198.51.100.1:{PORT}",
            "--handshake-timeout",
            str(TIMEOUT),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    siege = None
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        baseline = daemon_stats(tb)["connections"]
        siege = tb.host("client").popen(
            [
                sys.executable,
                "-c",
                SIEGE,
                "198.51.100.1",
                str(PORT),
                str(SILENT),
                str(TIMEOUT + 10),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert siege.stdout is not None and siege.stdout.readline().strip() == "open"
        opened = time.monotonic()
        assert daemon_stats(tb)["connections"] >= baseline + SILENT
        # Real clients, through the same proxy, while the silent ones wait.
        url = "http://{}:{}/bytes/65536".format(*tb.origin)
        for _ in range(5):
            rc, digest = curl_sha256(
                tb.host("client"), url, "--socks5", f"198.51.100.1:{PORT}", "--max-time", "5"
            )
            assert rc == 0 and digest == pattern_sha256(65536)
        closed = int(siege.stdout.readline())
        assert closed == SILENT
        assert time.monotonic() - opened >= TIMEOUT - 0.5  # by the timeout, not at once
        deadline = time.monotonic() + 10
        while daemon_stats(tb)["connections"] > baseline + 10 and time.monotonic() < deadline:
            time.sleep(0.2)  # FIN exchanges and TIME-WAIT (1 s MSL here)
        assert daemon_stats(tb)["connections"] <= baseline + 10
    finally:
        for p in (siege, proxy):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
