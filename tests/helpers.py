"""Helpers for namespace tests: run Python, curl and the load client in a host."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

from servers.pattern import DEFAULT_SEED, pattern_chunks


def pattern_sha256(size: int, seed: int = DEFAULT_SEED) -> str:
    """SHA-256 of the first `size` bytes the origin serves for /bytes/<size>."""
    h = hashlib.sha256()
    for chunk in pattern_chunks(seed, size):
        h.update(chunk)
    return h.hexdigest()


def run_py(host: Any, code: str, *args: str, timeout: float = 120) -> str:
    """Run a Python snippet inside `host`; return its stdout, fail with its stderr."""
    res = host.cmd([sys.executable, "-c", textwrap.dedent(code), *args], timeout=timeout)
    assert res.returncode == 0, f"snippet failed in {host.role}:\n{res.stderr}"
    return str(res.stdout)


def curl_sha256(host: Any, url: str, *extra: str, timeout: float = 120) -> tuple[int, str]:
    """curl `url` from `host`; return (exit code, sha256 of the body)."""
    code = """
        import hashlib, subprocess, sys
        p = subprocess.Popen(["curl", "-sS", "--max-time", sys.argv[1], *sys.argv[2:]],
                             stdout=subprocess.PIPE)
        h = hashlib.sha256()
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
        print(p.wait(), h.hexdigest())
    """
    out = run_py(host, code, str(int(timeout)), *extra, url, timeout=timeout + 10)
    rc, digest = out.split()
    return int(rc), digest


def loadgen(host: Any, *args: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Run our load client in `host`; return its JSON result lines."""
    res = host.cmd([sys.executable, "-m", "clients.loadgen", *args], timeout=timeout)
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert lines, f"loadgen printed no results (exit {res.returncode}):\n{res.stderr}"
    return lines


def upload_intact(host: Any, server: str, socks: str, size: str = "8M") -> None:
    """One POST of ``size`` bytes to the origin's sink through SOCKS5 ``socks``; the
    load client checks the sink's digest of what arrived."""
    results = loadgen(host, "--server", server, "--size", size, "--socks5", socks, "--upload")
    assert len(results) == 1 and results[0]["ok"], results


def concurrent_rounds(
    host: Any, server: str, socks: str, size: str, rounds: int = 3, clients: int = 100
) -> None:
    """``rounds`` rounds of ``clients`` concurrent content-checked downloads through
    SOCKS5 proxy ``socks`` (host:port texts); every one must succeed."""
    for _ in range(rounds):
        results = loadgen(
            host, "--server", server, "--size", size, "--socks5", socks,
            "--concurrency", str(clients),
        )  # fmt: skip
        failed = [r for r in results if not r["ok"]]
        assert len(results) == clients and failed == [], failed[:3]


def socks_reply_code(host: Any, proxy: tuple[str, int], request: bytes) -> int | None:
    """Send a raw SOCKS5 greeting + `request`; return the reply code (None: closed)."""
    code = """
        import socket, sys
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        s.sendall(b"\\x05\\x01\\x00")
        assert s.recv(2) == b"\\x05\\x00"
        s.sendall(bytes.fromhex(sys.argv[3]))
        reply = s.recv(64)
        print(reply[1] if len(reply) >= 2 else "None")
    """
    out = run_py(host, code, proxy[0], str(proxy[1]), request.hex()).strip()
    return None if out == "None" else int(out)


def connect_request(addr: str, port: int, cmd: int = 1) -> bytes:
    """A SOCKS5 request for an IPv4 address (RFC 1928 section 4)."""
    return bytes([5, cmd, 0, 1, *map(int, addr.split("."))]) + port.to_bytes(2, "big")


def daemon_stats(tb: Any) -> dict[str, Any]:
    """The splice daemon's daemon-wide stats, asked over its API from the proxy host."""
    out = run_py(
        tb.host("proxy"),
        """
        import json, sys
        from daemon.api.client import SpliceClient
        with SpliceClient(sys.argv[1]) as api:
            print(json.dumps(api.stats()))
        """,
        str(tb.daemon_socket),
    )
    return dict(json.loads(out))


def half_close_through_socks(
    host: Any, proxy: tuple[str, int], sink: tuple[str, int], size: int
) -> bool:
    """Send `size` random bytes to the raw sink through a SOCKS5 proxy, shut down
    writing, and check the sink's SHA-256 answer still arrives (half-close)."""
    out = run_py(
        host,
        """
        import hashlib, os, socket, sys
        from clients.socks5 import socks5_connect
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        socks5_connect(s, sys.argv[3], int(sys.argv[4]))
        body = os.urandom(int(sys.argv[5]))
        s.sendall(body)
        s.shutdown(socket.SHUT_WR)   # the client stops writing, keeps reading
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        print(answer.decode().strip() == hashlib.sha256(body).hexdigest())
        """,
        proxy[0],
        str(proxy[1]),
        sink[0],
        str(sink[1]),
        str(size),
    )
    return out.strip() == "True"


def same_port_twice(host: Any, proxy: tuple[str, int], origin: tuple[str, int]) -> str:
    """Two SOCKS5 downloads in a row from the same client port.

    The origin closes first, so the client closes passively and may reuse the
    port at once, while the proxy side may still hold the old 4-tuple in
    TIME-WAIT.  Prints the two body lengths.
    """
    return run_py(
        host,
        """
        import socket, sys, time
        from clients.socks5 import socks5_connect
        out = []
        for _ in range(2):
            deadline = time.monotonic() + 5
            while True:  # our own side of the last connection may still be in LAST-ACK
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("192.0.2.2", 40123))
                s.settimeout(10)
                try:
                    s.connect((sys.argv[1], int(sys.argv[2])))
                    break
                except OSError as exc:
                    s.close()
                    if exc.errno != 99 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            socks5_connect(s, sys.argv[3], int(sys.argv[4]))
            s.sendall(b"GET /bytes/20000 HTTP/1.0\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            out.append(len(data.split(b"\\r\\n\\r\\n", 1)[1]))
            s.close()
        print(*out)
        """,
        proxy[0],
        str(proxy[1]),
        origin[0],
        str(origin[1]),
    ).strip()


@contextlib.contextmanager
def kernel_socks_splicing_after(tb: Any, port: int, budget: int = 65536) -> Iterator[str]:
    """A second kernel SOCKS5 (proxies/socks5_kernel) on the testbed's daemon, on ``port``
    of the kernel SOCKS5's address, handing pairs over after ``budget`` bytes
    (``--splice-after``); yields its "host:port", stopped afterwards."""
    addr = tb.kernel_socks[0]
    proxy = tb.host("proxy").popen(
        [
            sys.executable, "-m", "proxies.socks5_kernel",
            "--daemon", str(tb.daemon_socket),
            "--listen", f"{addr}:{port}",
            "--splice-after", str(budget),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        yield f"{addr}:{port}"
    finally:
        proxy.kill()
        proxy.wait()
