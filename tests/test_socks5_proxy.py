"""The plain SOCKS5 proxy end to end on loopback: curl and a raw SOCKS client against it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sockutil import (
    other_threads,
    payload,
    recv_exactly,
    recv_to_eof,
    sha256,
    signal_thread,
    wait_until,
)

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ["splice", "buffer"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


# --- the origin HTTP server: GET /N serves payload(N), POST answers the body's sha256 ---


class OriginHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = payload(int(self.path.lstrip("/")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        remaining = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        answer = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), OriginHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# --- the proxy under test, as a subprocess ---


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int


def start_proxy(*extra: str) -> Proxy:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxies.socks5", "--listen", f"{LOOPBACK}:{port}", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=10):
            process.kill()
            raise AssertionError("proxy did not print ready")
    assert process.stdout.readline() == b"ready\n"
    return Proxy(process, port)


def stop_proxy(proxy: Proxy) -> int:
    if proxy.process.poll() is None:
        proxy.process.send_signal(signal.SIGTERM)
    try:
        return proxy.process.wait(timeout=5)
    finally:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait()


@contextlib.contextmanager
def running_proxy(*extra: str) -> Iterator[Proxy]:
    proxy = start_proxy(*extra)
    try:
        yield proxy
    finally:
        stop_proxy(proxy)


@pytest.fixture(scope="module", params=STRATEGIES)
def proxy(request: pytest.FixtureRequest) -> Iterator[Proxy]:
    with running_proxy("--copy", request.param) as running:
        yield running


# --- a raw SOCKS5 client, written from RFC 1928 independently of the code under test ---


@dataclass
class SocksReply:
    code: int
    bound: tuple[str, int]


def socks_handshake(
    proxy_port: int, address_part: bytes, *, command: int = 1
) -> tuple[socket.socket, SocksReply]:
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exactly(sock, 2) == b"\x05\x00"
    sock.sendall(bytes([5, command, 0]) + address_part)
    head = recv_exactly(sock, 4)
    assert head[0] == 5
    assert head[3] == 1  # this proxy only binds IPv4 in these tests
    body = recv_exactly(sock, 6)
    (port,) = struct.unpack("!H", body[4:])
    return sock, SocksReply(head[1], (socket.inet_ntoa(body[:4]), port))


def ipv4_address(host: str, port: int) -> bytes:
    return b"\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "60", *args],
        capture_output=True,
        check=False,
        timeout=90,
    )


# --- transfers ---


@pytest.mark.parametrize(
    "size",
    [1024, 1 << 20, pytest.param(64 << 20, marks=pytest.mark.slow)],
    ids=["1KB", "1MB", "64MB"],
)
def test_download_through_proxy_arrives_intact(proxy: Proxy, origin: int, size: int) -> None:
    result = curl("--socks5", f"{LOOPBACK}:{proxy.port}", f"http://{LOOPBACK}:{origin}/{size}")
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == sha256(payload(size))


def test_upload_through_proxy_arrives_intact(proxy: Proxy, origin: int, tmp_path: Path) -> None:
    upload = tmp_path / "upload"
    upload.write_bytes(payload(8 << 20))
    result = curl(
        "--socks5",
        f"{LOOPBACK}:{proxy.port}",
        "-H",
        "Expect:",  # the origin is HTTP/1.0: no 100-continue wait
        "--data-binary",
        f"@{upload}",
        f"http://{LOOPBACK}:{origin}/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == sha256(payload(8 << 20))


def test_domain_name_is_resolved_by_the_proxy(proxy: Proxy, origin: int) -> None:
    result = curl(
        "--socks5-hostname", f"{LOOPBACK}:{proxy.port}", f"http://localhost:{origin}/4096"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload(4096)


def test_success_reply_names_the_outgoing_socket(proxy: Proxy) -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:
        sock, reply = socks_handshake(proxy.port, ipv4_address(*listener.getsockname()))
        with sock:
            accepted, peer = listener.accept()
            accepted.close()
    assert reply.code == 0x00
    assert reply.bound == peer


def test_many_clients_at_once(proxy: Proxy, origin: int) -> None:
    sizes = [100_000 + n for n in range(16)]
    urls = [f"http://{LOOPBACK}:{origin}/{size}" for size in sizes]
    processes = [
        subprocess.Popen(
            ["curl", "-sS", "--max-time", "60", "--socks5", f"{LOOPBACK}:{proxy.port}", url],
            stdout=subprocess.PIPE,
        )
        for url in urls
    ]
    for size, process in zip(sizes, processes, strict=True):
        out, _ = process.communicate(timeout=90)
        assert process.returncode == 0
        assert sha256(out) == sha256(payload(size))


# --- half-close and reset ---


def test_half_close_keeps_the_other_direction_flowing(proxy: Proxy) -> None:
    request = payload(2 << 20)
    answer = payload(3 << 20)
    seen: list[bytes] = []

    def serve_once(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            seen.append(recv_to_eof(conn))  # the client's FIN arrives here as EOF
            conn.sendall(answer)

    with socket.create_server((LOOPBACK, 0)) as listener:
        server = threading.Thread(target=serve_once, args=(listener,))
        server.start()
        sock, reply = socks_handshake(proxy.port, ipv4_address(*listener.getsockname()))
        with sock:
            assert reply.code == 0
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            received = recv_to_eof(sock)
        server.join(timeout=30)
    assert sha256(seen[0]) == sha256(request)
    assert sha256(received) == sha256(answer)


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_reset_from_server_resets_the_client(proxy: Proxy) -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:
        sock, reply = socks_handshake(proxy.port, ipv4_address(*listener.getsockname()))
        with sock:
            assert reply.code == 0
            conn, _ = listener.accept()
            reset(conn)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)


def test_reset_from_client_resets_the_server(proxy: Proxy) -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:
        sock, reply = socks_handshake(proxy.port, ipv4_address(*listener.getsockname()))
        assert reply.code == 0
        conn, _ = listener.accept()
        with conn:
            reset(sock)
            conn.settimeout(10)
            with pytest.raises(ConnectionResetError):
                conn.recv(1)


# --- connect failures ---


def test_refused_port_gets_reply_0x05(proxy: Proxy) -> None:
    closed = free_port()
    result = curl("--socks5", f"{LOOPBACK}:{proxy.port}", f"http://{LOOPBACK}:{closed}/")
    assert result.returncode == 97  # CURLE_PROXY
    assert b"SOCKS5" in result.stderr
    sock, reply = socks_handshake(proxy.port, ipv4_address(LOOPBACK, closed))
    sock.close()
    assert reply.code == 0x05


def test_connect_timeout_gets_reply_0x06(origin: int) -> None:
    # A listener that never accepts: once its accept queue is full, Linux
    # drops further SYNs, so a connect to it hangs until the proxy's timeout.
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        target = listener.getsockname()
        for _ in range(8):
            filler = stack.enter_context(socket.socket())
            filler.settimeout(0.3)
            try:
                filler.connect(target)
            except TimeoutError:
                break
        else:
            pytest.fail("accept queue never filled")
        with running_proxy("--connect-timeout", "0.5") as proxy:
            started = time.monotonic()
            sock, reply = socks_handshake(proxy.port, ipv4_address(*target))
            sock.close()
            assert reply.code == 0x06
            assert time.monotonic() - started < 5


def test_unresolvable_name_gets_reply_0x04(proxy: Proxy) -> None:
    name = b"no-such-host.invalid"  # RFC 6761: .invalid never resolves
    part = b"\x03" + bytes([len(name)]) + name + b"\x00\x50"
    sock, reply = socks_handshake(proxy.port, part)
    sock.close()
    assert reply.code == 0x04


# --- malformed requests: the right code, then the next client is served ---


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x05\x02\x00" + ipv4_address(LOOPBACK, 80), 0x07),  # BIND
        (b"\x05\x03\x00" + ipv4_address(LOOPBACK, 80), 0x07),  # UDP ASSOCIATE
        (b"\x05\x01\x00\x02garbage", 0x08),  # unknown ATYP
        (b"\x04\x01\x00" + ipv4_address(LOOPBACK, 80), 0x01),  # wrong version
    ],
    ids=["bind", "udp-associate", "unknown-atyp", "bad-version"],
)
def test_malformed_request_gets_code_and_next_client_is_served(
    proxy: Proxy, origin: int, request_bytes: bytes, code: int
) -> None:
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(request_bytes)
        reply = recv_to_eof(sock)
    assert reply[:2] == bytes([5, code])
    assert len(reply) == 10
    result = curl("--socks5", f"{LOOPBACK}:{proxy.port}", f"http://{LOOPBACK}:{origin}/1000")
    assert result.stdout == payload(1000)


def test_rejected_client_still_sending_gets_its_reply(proxy: Proxy) -> None:
    # Unread input at close() makes the kernel send RST, which can destroy the
    # reply in flight; the proxy reads the client out before closing.
    bind = b"\x05\x02\x00" + ipv4_address(LOOPBACK, 80)
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00" + bind + payload(4 << 20))
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b"\x05\x00" + b"\x05\x07\x00\x01" + bytes(6)


def test_non_socks5_greeting_is_closed_without_reply(proxy: Proxy, origin: int) -> None:
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert recv_to_eof(sock) == b""
    result = curl("--socks5", f"{LOOPBACK}:{proxy.port}", f"http://{LOOPBACK}:{origin}/1000")
    assert result.stdout == payload(1000)


# --- username/password (RFC 1929) ---


@pytest.fixture(scope="module")
def auth_proxy() -> Iterator[Proxy]:
    with running_proxy("--user", "alice", "--password", "s3cret") as running:
        yield running


def test_auth_with_right_password_serves(auth_proxy: Proxy, origin: int) -> None:
    result = curl(
        "--socks5", f"alice:s3cret@{LOOPBACK}:{auth_proxy.port}", f"http://{LOOPBACK}:{origin}/5000"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload(5000)


def test_auth_with_wrong_password_fails(auth_proxy: Proxy, origin: int) -> None:
    result = curl(
        "--socks5", f"alice:wrong@{LOOPBACK}:{auth_proxy.port}", f"http://{LOOPBACK}:{origin}/5000"
    )
    assert result.returncode == 97
    with socket.create_connection((LOOPBACK, auth_proxy.port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x05alice\x05wrong")
        assert recv_to_eof(sock) == b"\x01\x01"


def test_auth_required_refuses_no_auth(auth_proxy: Proxy, origin: int) -> None:
    result = curl("--socks5", f"{LOOPBACK}:{auth_proxy.port}", f"http://{LOOPBACK}:{origin}/5000")
    assert result.returncode == 97
    with socket.create_connection((LOOPBACK, auth_proxy.port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_to_eof(sock) == b"\x05\xff"


# --- process behaviour ---


def test_port_already_taken_exits_nonzero_with_message() -> None:
    with socket.create_server((LOOPBACK, 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxies.socks5", "--listen", f"{LOOPBACK}:{port}"],
            cwd=REPO,
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode != 0
    assert b"ready" not in result.stdout
    assert os.strerror(errno.EADDRINUSE).encode() in result.stderr


def test_sigterm_exits_cleanly_and_frees_the_port() -> None:
    proxy = start_proxy()
    assert stop_proxy(proxy) == 0
    assert proxy.process.stderr is not None
    assert b"Traceback" not in proxy.process.stderr.read()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((LOOPBACK, proxy.port))  # raises if the listener were still open


def test_listen_again_for_another_family(origin: int) -> None:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port6 = probe.getsockname()[1]
    with running_proxy("--listen", f"[::1]:{port6}") as proxy:
        url = f"http://{LOOPBACK}:{origin}/4321"
        for socks in (f"{LOOPBACK}:{proxy.port}", f"[::1]:{port6}"):
            assert curl("--socks5", socks, url).stdout == payload(4321)


def test_sigterm_taken_by_a_client_thread_still_stops_the_proxy() -> None:
    """Linux may give a process-directed SIGTERM to any thread; the main one must still wake.

    CPython runs the handler in the main thread, which waits for connections.
    """
    proxy = start_proxy()
    try:
        with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as client:
            client.sendall(b"\x05\x01\x00")  # a greeting; the request never follows
            assert recv_exactly(client, 2) == b"\x05\x00"
            [handler] = other_threads(proxy.process.pid)  # reading the request
            signal_thread(proxy.process.pid, handler, signal.SIGTERM)
            assert proxy.process.wait(timeout=5) == 0
    finally:
        stop_proxy(proxy)


def test_client_silent_after_connect_does_not_block_others(proxy: Proxy, origin: int) -> None:
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10):
        result = curl("--socks5", f"{LOOPBACK}:{proxy.port}", f"http://{LOOPBACK}:{origin}/777")
    assert result.stdout == payload(777)


def test_finished_connections_release_sockets_and_pipes(origin: int) -> None:
    with running_proxy("--copy", "splice") as proxy:
        fd_dir = Path(f"/proc/{proxy.process.pid}/fd")
        baseline = len(list(fd_dir.iterdir()))
        for size in (1000, 300_000):
            result = curl(
                "--socks5", f"{LOOPBACK}:{proxy.port}", f"http://{LOOPBACK}:{origin}/{size}"
            )
            assert result.stdout == payload(size)
        test_reset_from_server_resets_the_client(proxy)
        test_reset_from_client_resets_the_server(proxy)
        test_half_close_keeps_the_other_direction_flowing(proxy)
        assert wait_until(lambda: len(list(fd_dir.iterdir())) == baseline), sorted(
            os.readlink(fd) for fd in fd_dir.iterdir()
        )
