"""clients.loadgen and clients.socks5 against the real origin and small misbehaving fakes."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from clients.loadgen import Result, Socks5Proxy, fetch, parse_size, run_load, upload
from clients.socks5 import (
    Socks5AuthError,
    Socks5Error,
    Socks5ProtocolError,
    connect_request,
    socks5_connect,
)
from servers.http1 import head_end
from servers.origin import OriginServer
from servers.pattern import DEFAULT_SEED, pattern_bytes

REPO = Path(__file__).resolve().parent.parent

Handler = Callable[[socket.socket], None]


@contextmanager
def tcp_server(handler: Handler) -> Iterator[tuple[str, int]]:
    """A loopback listener running ``handler`` on each connection in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn, suppress(OSError):
            handler(conn)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed: the test is over
            thread = threading.Thread(target=serve, args=(conn,), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        # shutdown() wakes the blocked accept(); close() alone may not.
        with suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)


@pytest.fixture(scope="module")
def origin() -> Iterator[tuple[str, int]]:
    server = OriginServer(("127.0.0.1", 0), log=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.http_address
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.close()


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while head_end(data) < 0:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def respond_with(body: bytes, length: int) -> Handler:
    def handler(conn: socket.socket) -> None:
        read_head(conn)
        head = f"HTTP/1.0 200 OK\r\nContent-Length: {length}\r\n\r\n".encode()
        conn.sendall(head + body)

    return handler


# --- sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("1500", 1500), ("1K", 1024), ("16m", 16 << 20), ("1G", 1 << 30), ("2T", 2 << 40)],
)
def test_sizes_take_binary_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "1.5M", "-1", "1KB", "ten"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# --- fetch and upload against the real origin ----------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100_000, 3 << 20])
def test_fetch_verifies_the_download(origin: tuple[str, int], size: int) -> None:
    result = fetch(origin, size, timeout=10)
    assert result.ok, result
    assert result.error is None and result.bytes == size
    assert result.response_time_s is not None and result.response_time_s > 0
    assert result.mode == "direct" and result.op == "get"


def test_upload_checks_the_digest_the_origin_returns(origin: tuple[str, int]) -> None:
    result = upload(origin, 5 << 20, timeout=10)
    assert result.ok, result
    assert result.op == "upload" and result.bytes == 5 << 20


def test_upload_reports_a_wrong_digest_as_corrupt() -> None:
    with tcp_server(respond_with(b"0" * 64 + b"\n", 65)) as fake:
        result = upload(fake, 1000, timeout=10)
    assert (result.ok, result.error, result.response_time_s) == (False, "corrupt", None)


# --- failures are named, never timed -------------------------------------------------


def test_refused_connection_is_reported_as_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = s.getsockname()[:2]  # bound, not listening: the kernel answers RST
        result = fetch(address, 1024, timeout=5)
    assert (result.ok, result.error, result.response_time_s) == (False, "refused", None)


def test_server_closing_early_is_reported_as_short() -> None:
    with tcp_server(respond_with(pattern_bytes(DEFAULT_SEED, 500), 1000)) as fake:
        result = fetch(fake, 1000, timeout=10)
    assert (result.ok, result.error, result.response_time_s) == (False, "short", None)
    assert result.bytes == 500


def test_wrong_content_is_reported_as_corrupt_with_the_offset() -> None:
    body = bytearray(pattern_bytes(DEFAULT_SEED, 100_000))
    body[77_777] ^= 0x10
    with tcp_server(respond_with(bytes(body), len(body))) as fake:
        result = fetch(fake, len(body), timeout=10)
    assert (result.ok, result.error, result.response_time_s) == (False, "corrupt", None)
    assert result.detail is not None and "77777" in result.detail


def test_bytes_beyond_the_content_length_are_reported_as_corrupt() -> None:
    body = pattern_bytes(DEFAULT_SEED, 2000)
    with tcp_server(respond_with(body, 1000)) as fake:
        result = fetch(fake, 1000, timeout=10)
    assert (result.ok, result.error) == (False, "corrupt")


def test_error_status_is_reported_as_http(origin: tuple[str, int]) -> None:
    def not_found(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    with tcp_server(not_found) as fake:
        result = fetch(fake, 10, timeout=10)
    assert (result.ok, result.error, result.detail) == (False, "http", "status 404 Not Found")


def test_silent_server_is_reported_as_timeout() -> None:
    release = threading.Event()

    def silent(conn: socket.socket) -> None:
        read_head(conn)
        release.wait(10)

    with tcp_server(silent) as fake:
        result = fetch(fake, 10, timeout=0.3)
        release.set()
    assert (result.ok, result.error, result.response_time_s) == (False, "timeout", None)


# --- SOCKS5 -----------------------------------------------------------------------------


def recv_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_connect_request(conn: socket.socket) -> tuple[str, int]:
    version, cmd, _, atyp = recv_exactly(conn, 4)
    assert (version, cmd) == (5, 1)
    if atyp == 1:
        host = str(ipaddress.ip_address(recv_exactly(conn, 4)))
    elif atyp == 4:
        host = str(ipaddress.ip_address(recv_exactly(conn, 16)))
    else:
        host = recv_exactly(conn, recv_exactly(conn, 1)[0]).decode()
    (port,) = struct.unpack("!H", recv_exactly(conn, 2))
    return host, port


def fake_socks5(
    reply_code: int = 0,
    credentials: tuple[str, str] | None = None,
    seen: list[str] | None = None,
    delay: float = 0.0,
) -> Handler:
    """A one-connection SOCKS5 server: negotiate, then relay or fail with ``reply_code``.

    ``delay``: seconds to wait before the CONNECT reply (a slow set-up).
    """

    def handler(conn: socket.socket) -> None:
        version, count = recv_exactly(conn, 2)
        methods = recv_exactly(conn, count)
        wanted = 2 if credentials else 0
        if version != 5 or wanted not in methods:
            conn.sendall(b"\x05\xff")
            return
        conn.sendall(bytes([5, wanted]))
        if credentials:
            _, ulen = recv_exactly(conn, 2)
            user = recv_exactly(conn, ulen).decode()
            password = recv_exactly(conn, recv_exactly(conn, 1)[0]).decode()
            if (user, password) != credentials:
                conn.sendall(b"\x01\x01")
                return
            conn.sendall(b"\x01\x00")
        host, port = read_connect_request(conn)
        if seen is not None:
            seen.append(f"{host}:{port}")
        if reply_code:
            conn.sendall(bytes([5, reply_code, 0, 1, 0, 0, 0, 0, 0, 0]))
            return
        target = socket.create_connection(("127.0.0.1" if host == "localhost" else host, port))
        time.sleep(delay)
        conn.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x30\x39")  # bound 127.0.0.1:12345
        relay(conn, target)

    return handler


def relay(a: socket.socket, b: socket.socket) -> None:
    def pump(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join(timeout=30)
    b.close()


def test_socks5_failure_reply_is_reported_with_its_code(origin: tuple[str, int]) -> None:
    with tcp_server(fake_socks5(reply_code=0x05)) as proxy:
        result = fetch(origin, 1000, Socks5Proxy(*proxy), timeout=10)
    assert (result.ok, result.error, result.response_time_s) == (False, "socks5:0x05", None)
    assert result.mode == "socks5"


def test_fetch_through_socks5_connects_to_the_origin_and_verifies(origin: tuple[str, int]) -> None:
    seen: list[str] = []
    with tcp_server(fake_socks5(seen=seen)) as proxy:
        result = fetch(origin, 2 << 20, Socks5Proxy(*proxy), timeout=10)
    assert result.ok, result
    assert result.mode == "socks5" and result.bytes == 2 << 20
    assert seen == [f"{origin[0]}:{origin[1]}"]


def test_set_up_is_timed_apart_from_the_transfer(origin: tuple[str, int]) -> None:
    # The fake proxy sits on its CONNECT reply: that wait is set-up, not response time.
    with tcp_server(fake_socks5(delay=0.3)) as proxy:
        slow = fetch(origin, 1000, Socks5Proxy(*proxy), timeout=10)
    direct = fetch(origin, 1000, timeout=10)
    assert slow.ok and direct.ok, (slow, direct)
    assert slow.setup_s is not None and slow.response_time_s is not None
    assert slow.setup_s >= 0.3 and slow.response_time_s < 0.3
    assert direct.setup_s is not None and 0 < direct.setup_s < 0.3
    for r in (slow, direct):
        assert r.end is not None and r.response_time_s is not None and r.setup_s is not None
        assert r.end - r.start >= r.setup_s + r.response_time_s


def test_a_failed_transfer_keeps_its_set_up_time_and_a_refused_one_has_none() -> None:
    with tcp_server(respond_with(pattern_bytes(DEFAULT_SEED, 500), 1000)) as fake:
        short = fetch(fake, 1000, timeout=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = fetch(s.getsockname()[:2], 1000, timeout=5)
    assert (short.error, refused.error) == ("short", "refused")
    assert short.setup_s is not None and refused.setup_s is None
    assert short.end is not None and refused.end is not None and refused.end >= refused.start


def test_socks5_with_username_and_password(origin: tuple[str, int]) -> None:
    with tcp_server(fake_socks5(credentials=("alice", "s3cret"))) as proxy:
        good = fetch(origin, 1000, Socks5Proxy(*proxy, "alice", "s3cret"), timeout=10)
        bad = fetch(origin, 1000, Socks5Proxy(*proxy, "alice", "wrong"), timeout=10)
        none = fetch(origin, 1000, Socks5Proxy(*proxy), timeout=10)
    assert good.ok, good
    assert (bad.ok, bad.error) == (False, "socks5:auth")
    assert (none.ok, none.error) == (False, "socks5:auth")


def test_socks5_connect_sends_names_as_domains_and_returns_the_bound_address(
    origin: tuple[str, int],
) -> None:
    seen: list[str] = []
    with tcp_server(fake_socks5(seen=seen)) as proxy, socket.create_connection(proxy) as sock:
        bound = socks5_connect(sock, "localhost", origin[1])
    assert seen == [f"localhost:{origin[1]}"]
    assert bound == ("127.0.0.1", 12345)


def test_socks5_connect_request_encodes_each_address_type() -> None:
    assert connect_request("192.0.2.7", 80) == bytes.fromhex("050100 01 c0000207 0050")
    assert connect_request("2001:db8::1", 443) == (
        bytes.fromhex("050100 04") + ipaddress.ip_address("2001:db8::1").packed + b"\x01\xbb"
    )
    assert connect_request("example.org", 8080) == b"\x05\x01\x00\x03\x0bexample.org\x1f\x90"


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (b"\x04\x00", Socks5ProtocolError),  # a SOCKS4 answer
        (b"\x05\x02", Socks5ProtocolError),  # a method we did not offer
        (b"\x05\xff", Socks5AuthError),
        (b"\x05\x00\x05\x03", Socks5Error),  # REP then close: the code still counts
        (b"\x05\x00\x05\x00\x00\x09", Socks5ProtocolError),  # unknown ATYP
        (b"\x05\x00\x05", Socks5ProtocolError),  # EOF inside the reply
    ],
)
def test_socks5_protocol_violations_raise_clear_errors(
    script: bytes, error: type[Exception]
) -> None:
    def scripted(conn: socket.socket) -> None:
        conn.recv(3)
        conn.sendall(script)
        with suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1024)

    with (
        tcp_server(scripted) as proxy,
        socket.create_connection(proxy, timeout=5) as sock,
        pytest.raises(error) as raised,
    ):
        socks5_connect(sock, "192.0.2.1", 80)
    if isinstance(raised.value, Socks5Error):
        assert raised.value.reply_code == 0x03


# --- workers and the command line -----------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.loadgen", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_workers_are_separate_processes_running_at_the_same_time() -> None:
    # The fake answers nobody until all three clients are connected at once,
    # so sequential workers would time out instead of succeeding.
    concurrency = 3
    gate = threading.Barrier(concurrency, timeout=10)

    def gated(conn: socket.socket) -> None:
        read_head(conn)
        gate.wait()
        body = pattern_bytes(DEFAULT_SEED, 5000)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5000\r\n\r\n" + body)

    with tcp_server(gated) as fake:
        results = list(run_load(fake, [5000], concurrency=concurrency, timeout=15))
    assert all(r.ok for r in results), results
    assert sorted(r.worker for r in results) == [0, 1, 2]
    pids = {r.pid for r in results}
    assert len(pids) == concurrency
    assert os.getpid() not in pids


def test_warm_up_requests_are_untimed_and_all_done_before_any_timed_one() -> None:
    # The second warm-up to arrive is held back: a worker released before it
    # ends would send its timed request while the other still warms up.
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def logging_origin(conn: socket.socket) -> None:
        path = read_head(conn).split(b" ")[1].decode()
        with lock:
            events.append(("start", path))
            late = path == "/bytes/1" and sum(p == path for _, p in events) == 2
        if late:
            time.sleep(0.5)
        size = int(path.rsplit("/", 1)[1])
        body = pattern_bytes(DEFAULT_SEED, size)
        conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + body)
        with lock:
            events.append(("done", path))

    with tcp_server(logging_origin) as fake:
        results = list(run_load(fake, [5000], concurrency=2, timeout=15, warmup=True))
    assert [r.size for r in results] == [5000, 5000] and all(r.ok for r in results)
    paths = [p for kind, p in events if kind == "start"]
    assert sorted(paths) == ["/bytes/1", "/bytes/1", "/bytes/5000", "/bytes/5000"]
    last_warm_up = max(i for i, e in enumerate(events) if e == ("done", "/bytes/1"))
    first_timed = min(i for i, e in enumerate(events) if e == ("start", "/bytes/5000"))
    assert last_warm_up < first_timed, events


def test_command_line_prints_one_json_line_per_request(origin: tuple[str, int]) -> None:
    server = f"{origin[0]}:{origin[1]}"
    done = run_cli(
        *("--server", server, "--size", "1K", "--size", "100000"),
        *("--repeat", "2", "--concurrency", "2", "--warmup"),
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 2 * 2 * 2  # the warm-ups are not reported
    fields = {"mode", "size", "ok", "response_time_s", "bytes", "error", "worker", "start"}
    fields |= {"setup_s", "end"}
    for record in records:
        assert fields <= record.keys()
        assert record["mode"] == "direct" and record["ok"] is True and record["error"] is None
        assert record["bytes"] == record["size"] and record["response_time_s"] > 0
        assert record["setup_s"] > 0 and record["end"] > record["start"]
        assert Result(**record).ok
    assert sorted(r["size"] for r in records) == [1024] * 4 + [100000] * 4
    assert {r["worker"] for r in records} == {0, 1}
    assert "loadgen: 8 requests, 0 failed, median" in done.stderr


def test_command_line_exits_1_and_reports_failures() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        done = run_cli("--server", f"127.0.0.1:{port}", "--size", "1K", "--repeat", "3")
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["error"] for r in records] == ["refused"] * 3
    assert all(r["response_time_s"] is None for r in records)
    assert "3 requests, 3 failed (refused: 3)" in done.stderr


def test_command_line_upload_through_socks5(origin: tuple[str, int]) -> None:
    with tcp_server(fake_socks5(credentials=("u", "p"))) as proxy:
        done = run_cli(
            *("--server", f"{origin[0]}:{origin[1]}", "--size", "1M", "--upload"),
            *("--socks5", f"{proxy[0]}:{proxy[1]}", "--user", "u", "--password", "p"),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert (record["mode"], record["op"], record["ok"]) == ("socks5", "upload", True)
