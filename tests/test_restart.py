"""The splice daemon dies (SIGKILL) and `testbed up` repairs it: what proxies and clients see.

* The proxies attached to it notice at once (the API socket closes:
  EDISCONNECTED in the client library) and exit with one log line, rather
  than serve nothing.
* `status` shows the daemon dead; `up` starts it and the proxies again.
* A client whose connection the old daemon terminated (not spliced) gets a
  RST from the new daemon at its next segment: it knows nothing of the
  connection (RFC 9293 3.10.7.1), and the client does not hang.
* New connections through the spliced SOCKS5 work, content-checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from testbed.net import Testbed
from tests.conftest import unique_prefix
from tests.helpers import curl_sha256, pattern_sha256

pytestmark = pytest.mark.root

# A SOCKS5 client that stops after the method negotiation (its connection
# is the daemon's, not spliced), waits for a line, then sends its request.
HALF_OPEN_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"\\x05\\x01\\x00")
assert s.recv(2) == b"\\x05\\x00"
print("negotiated", flush=True)
sys.stdin.readline()
try:
    s.sendall(bytes([5, 1, 0, 1, 203, 0, 113, 2, 0, 80]))
    print("reply", s.recv(10), flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except TimeoutError:
    print("timeout", flush=True)
"""


def _alive(tb: Testbed, name: str) -> bool:
    return bool(tb.status()["services"][name]["alive"])


def _wait(cond: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_killed_daemon_is_noticed_and_up_repairs_it() -> None:
    tb = Testbed(unique_prefix(), msl=1.0)
    client = None
    try:
        tb.up()
        proxy = "{}:{}".format(*tb.spliced_socks)
        url = "http://{}:{}/bytes/65536".format(*tb.origin)
        assert curl_sha256(tb.host("client"), url, "--socks5", proxy)[1] == pattern_sha256(65536)
        client = tb.host("client").popen(
            [sys.executable, "-c", HALF_OPEN_CLIENT, *map(str, tb.spliced_socks)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "negotiated"

        os.kill(tb.status()["services"]["daemon"]["pid"], signal.SIGKILL)
        proxies = ("socks5-spliced", "socks5-endpoint", "http-proxy")
        assert _wait(lambda: not any(_alive(tb, p) for p in proxies), 5.0), tb.status()
        assert not _alive(tb, "daemon")
        log = (tb.run_dir / "socks5-spliced.log").read_text()
        assert "the splice daemon went away" in log, log[-2000:]

        done = tb.up()
        assert "service daemon" in done and "service socks5-spliced" in done, done
        assert all(_alive(tb, p) for p in ("daemon", *proxies))

        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "reset"
        client.wait(timeout=10)

        for size in (1024, 1 << 20):
            url = "http://{}:{}/bytes/{}".format(*tb.origin, size)
            rc, digest = curl_sha256(tb.host("client"), url, "--socks5", proxy)
            assert rc == 0 and digest == pattern_sha256(size)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        tb.down()
