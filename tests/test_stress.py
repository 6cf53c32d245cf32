"""Many clients at once through the splice daemon: rounds of 100+ concurrent transfers.

Zero failures are allowed: every transfer is content-checked (the load
client verifies the seeded pattern, the HTTP snippet a SHA-256), and a
timeout is a failure, not a slow sample.  A lost wakeup in the daemon (bytes
a proxy wrote after ``splice`` that wait for the next segment from the
client) shows up here as a transfer that never gets its first byte.

Each test runs with the kernel fast path and without it (``spliced_tb``).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from testbed.net import Testbed
from tests.helpers import loadgen, pattern_sha256, run_py

pytestmark = pytest.mark.root

ROUNDS = 3
CLIENTS = 100


@pytest.fixture(scope="module")
def tb(spliced_tb: Testbed) -> Testbed:
    return spliced_tb


def _failures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if not r["ok"]]


def test_rounds_of_100_concurrent_spliced_socks5_transfers_all_succeed(tb: Testbed) -> None:
    for _ in range(ROUNDS):
        results = loadgen(
            tb.host("client"),
            "--server",
            "{}:{}".format(*tb.origin),
            "--size",
            "1M",
            "--socks5",
            "{}:{}".format(*tb.spliced_socks),
            "--concurrency",
            str(CLIENTS),
            "--timeout",
            "20",
            timeout=120,
        )
        assert len(results) == CLIENTS
        assert _failures(results) == []


HTTP_CLIENTS = """
import hashlib, socket, sys, threading
proxy = (sys.argv[1], int(sys.argv[2]))
origin, n, size = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
digests, errors = [], []
def one(i):
    try:
        s = socket.create_connection(proxy, timeout=20)
        s.settimeout(20)
        # A size per client: no two requests hit the same cache entry.
        url = f"http://{origin}/bytes/{size + i}"
        s.sendall(f"GET {url} HTTP/1.0\\r\\nHost: {origin}\\r\\n\\r\\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
        head, _, body = data.partition(b"\\r\\n\\r\\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head[:40]
        digests.append((size + i, hashlib.sha256(body).hexdigest()))
    except Exception as exc:
        errors.append(f"{i}: {exc!r}")
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
for size, d in digests: print(size, d)
for e in errors: print("ERROR", e)
"""


def test_rounds_of_100_concurrent_http_proxy_misses_all_succeed(tb: Testbed) -> None:
    for rnd in range(ROUNDS):
        base = (1 << 20) + 1000 * (rnd + 1) + 17 + (0 if tb.fastpath == "on" else 500)
        out = run_py(
            tb.host("client"),
            HTTP_CLIENTS,
            *map(str, tb.http_proxy),
            "{}:{}".format(*tb.origin),
            str(CLIENTS),
            str(base),
            timeout=120,
        )
        lines = out.split("\n")
        assert [line for line in lines if line.startswith("ERROR")] == []
        got = dict(line.split() for line in lines if line and not line.startswith("ERROR"))
        assert len(got) == CLIENTS
        for size, digest in got.items():
            assert digest == pattern_sha256(int(size)), size


# A proxy that writes its reply and lets go of both descriptors at once, as
# docs/api.md allows: the reply must still reach the client, at once.
HASTY_PROXY = """
import sys, threading
from daemon.api.client import SpliceClient
origin = (sys.argv[2], int(sys.argv[3]))
with SpliceClient(sys.argv[1]) as api:
    lst = api.listen(("198.51.100.1", 7020), backlog=1024)
    print("ready", flush=True)
    def serve(cli):
        assert cli.recv(3) == b"GO\\n"
        srv = api.intend_splice(cli)
        srv.connect(origin, timeout=10)
        reply = b"OK\\n"
        api.splice(cli, srv, len(reply))
        cli.sendall(reply)
        cli.close()
        srv.close()
    while True:
        threading.Thread(target=serve, args=(lst.accept(),), daemon=True).start()
"""

HASTY_CLIENTS = """
import hashlib, socket, sys, threading
n, size = int(sys.argv[1]), int(sys.argv[2])
digests, errors = [], []
def one(i):
    try:
        s = socket.create_connection(("198.51.100.1", 7020), timeout=15)
        s.settimeout(15)
        s.sendall(b"GO\\n")
        reply = b""
        while len(reply) < 3:
            chunk = s.recv(3 - len(reply))
            if not chunk:
                raise EOFError("no reply")
            reply += chunk
        assert reply == b"OK\\n", reply
        s.sendall(f"GET /bytes/{size} HTTP/1.0\\r\\n\\r\\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
        digests.append(hashlib.sha256(data.partition(b"\\r\\n\\r\\n")[2]).hexdigest())
    except Exception as exc:
        errors.append(f"{i}: {exc!r}")
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
for d in digests: print(d)
for e in errors: print("ERROR", e)
"""


def test_a_proxy_that_closes_right_after_its_reply_loses_no_client(tb: Testbed) -> None:
    proxy = tb.host("proxy").popen(
        [sys.executable, "-c", HASTY_PROXY, str(tb.daemon_socket), *map(str, tb.origin)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        size = 1 << 20
        for _ in range(ROUNDS):
            out = run_py(tb.host("client"), HASTY_CLIENTS, str(CLIENTS), str(size), timeout=120)
            lines = [line for line in out.split("\n") if line]
            assert [line for line in lines if line.startswith("ERROR")] == []
            assert lines == [pattern_sha256(size)] * CLIENTS
    finally:
        proxy.kill()
        proxy.wait()


HELD_CLIENTS = """
import socket, sys
from concurrent.futures import ThreadPoolExecutor
proxy, origin, total, batch = (sys.argv[1], int(sys.argv[2])), sys.argv[3], int(sys.argv[4]), 64
request = bytes([5, 1, 0, 1, *map(int, origin.split("."))]) + (80).to_bytes(2, "big")
held, missing = [], 0
def one(_):
    s = socket.create_connection(proxy, timeout=10)
    s.settimeout(10)
    s.sendall(b"\\x05\\x01\\x00")
    if s.recv(2) != b"\\x05\\x00":
        return s, False
    s.sendall(request)
    reply = b""
    try:
        while len(reply) < 10:
            chunk = s.recv(10 - len(reply))
            if not chunk:
                break
            reply += chunk
    except TimeoutError:
        pass
    return s, len(reply) == 10 and reply[1] == 0
with ThreadPoolExecutor(batch) as pool:
    for start in range(0, total, batch):
        for s, ok in pool.map(one, range(min(batch, total - start))):
            held.append(s)
            missing += not ok
print(missing)
"""


def test_connections_opened_64_at_a_time_and_held_all_get_their_reply(tb: Testbed) -> None:
    total = 1000
    out = run_py(
        tb.host("client"),
        HELD_CLIENTS,
        *map(str, tb.spliced_socks),
        tb.origin[0],
        str(total),
        timeout=240,
    )
    assert int(out.strip()) == 0
