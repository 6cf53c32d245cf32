"""clients.loadgen and clients.socks5 against the real origin and small misbehaving fakes."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from clients.loadgen import (
    HttpProxy,
    Result,
    Socks5Proxy,
    fetch,
    fetch_keepalive,
    parse_size,
    persistent,
    run_load,
    upload,
)
from clients.socks5 import (
    Socks5AuthError,
    Socks5Error,
    Socks5ProtocolError,
    connect_request,
    socks5_connect,
)
from servers.http1 import ResponseHead, content_length, head_end, parse_response_head
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


# --- HTTP proxies and keep-alive ------------------------------------------------------


class Buffered:
    """A socket read head by head: what arrives beyond a head waits for the next read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def head(self) -> bytes:
        """The next head, b"" if the peer closed first."""
        while (end := head_end(self.buffer)) < 0:
            data = self.sock.recv(1 << 16)
            if not data:
                return b""
            self.buffer += data
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        return head

    def relay(self, count: int, to: socket.socket) -> None:
        """Copy the next ``count`` bytes to ``to``."""
        while count:
            if not self.buffer:
                data = self.sock.recv(min(count, 1 << 16))
                if not data:
                    raise EOFError
                self.buffer += data
            chunk = bytes(self.buffer[:count])
            del self.buffer[: len(chunk)]
            to.sendall(chunk)
            count -= len(chunk)


def header(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def copying_http_proxy(seen: list[str]) -> Handler:
    """A copying HTTP forward proxy, keep-alive on both sides, for one client connection.

    Each request's absolute-form target (recorded in ``seen`` with its version)
    goes to the origin in origin-form on the proxy's own connection, kept while
    the client keeps its own; bodies are framed by Content-Length both ways.
    An HTTP/1.0 client's connection ends after its response, as HTTP/1.0 does.
    """

    def handler(conn: socket.socket) -> None:
        client = Buffered(conn)
        upstream: socket.socket | None = None
        try:
            while head := client.head():
                method, target, version = head.split(b"\r\n", 1)[0].decode().split(" ")
                seen.append(f"{method} {target} {version}")
                if method == "GET":  # what the proxy's cache would have served, if it had one
                    assert header(head, "cache-control") == "no-cache"
                url = urlsplit(target)
                assert url.hostname is not None and url.port is not None
                if upstream is None:
                    upstream = socket.create_connection((url.hostname, url.port))
                    origin = Buffered(upstream)
                rest = head.split(b"\r\n", 1)[1]
                upstream.sendall(f"{method} {url.path} {version}\r\n".encode() + rest)
                client.relay(int(header(head, "content-length") or 0), upstream)
                response = origin.head()
                conn.sendall(response)
                origin.relay(int(header(response, "content-length") or 0), conn)
                if version == "HTTP/1.0":
                    return
        finally:
            if upstream is not None:
                upstream.close()

    return handler


def origin_connections(origin: tuple[str, int]) -> int:
    """Connections the origin has accepted so far, the one asking its /stats included."""
    with socket.create_connection(origin, timeout=5) as sock:
        sock.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return int(json.loads(data[head_end(data) :])["connections"])


def test_keepalive_sends_every_request_on_one_connection_and_times_set_up_once(
    origin: tuple[str, int],
) -> None:
    before = origin_connections(origin)
    results = list(fetch_keepalive(origin, 100_000, timeout=10, requests=5))
    assert origin_connections(origin) - before == 2  # ours, and the second /stats
    assert all(r.ok and r.bytes == 100_000 for r in results), results
    assert [r.index_on_conn for r in results] == [0, 1, 2, 3, 4]
    setups = [r.setup_s for r in results]
    assert setups[0] is not None and setups[0] > 0 and setups[1:] == [0.0] * 4
    assert all(r.response_time_s is not None and r.response_time_s > 0 for r in results)
    assert all(r.mode == "direct" and r.detail is None for r in results)


def test_keepalive_checks_every_body_of_every_size(origin: tuple[str, int]) -> None:
    # 0 bytes and 3 MB: framing by Content-Length alone, no waiting for a close.
    for size in (0, 3 << 20):
        results = list(fetch_keepalive(origin, size, timeout=10, requests=3))
        assert [(r.ok, r.bytes, r.index_on_conn) for r in results] == [
            (True, size, 0),
            (True, size, 1),
            (True, size, 2),
        ]


def serve_requests(answer: Callable[[int, bytes], bytes | None]) -> Handler:
    """A server that answers each request on a connection with ``answer(index, head)``;
    None closes the connection instead (after reading that request)."""

    def handler(conn: socket.socket) -> None:
        client = Buffered(conn)
        index = 0
        while head := client.head():
            reply = answer(index, head)
            if reply is None:
                return
            conn.sendall(reply)
            index += 1

    return handler


def pattern_response(head: bytes, extra: dict[str, str] | None = None) -> bytes:
    size = int(head.split(b" ")[1].rsplit(b"/", 1)[1])
    fields = "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
    return f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n{fields}\r\n".encode() + pattern_bytes(
        DEFAULT_SEED, size
    )


def test_a_server_ending_each_connection_after_one_response_gets_a_new_one_each_time() -> None:
    # tinyproxy 1.11 does this: HTTP/1.1 responses with no "Connection: close",
    # then its FIN.  Each request opens a connection: index 0, set-up timed.
    def one_then_close(index: int, head: bytes) -> bytes | None:
        return pattern_response(head) if index == 0 else None

    def said_close(index: int, head: bytes) -> bytes | None:
        return pattern_response(head, {"Connection": "close"})

    for answer in (one_then_close, said_close):
        with tcp_server(serve_requests(answer)) as fake:
            results = list(fetch_keepalive(fake, 5000, timeout=10, requests=4))
        assert all(r.ok for r in results), results
        assert [r.index_on_conn for r in results] == [0, 0, 0, 0]
        assert all(r.setup_s is not None and r.setup_s > 0 for r in results)


def test_a_request_a_reused_connection_drops_unanswered_is_sent_once_more() -> None:
    # The server reads the second request on each connection and closes: the
    # race RFC 9112 9.3.1 lets a client retry (GET is idempotent).
    heads: list[bytes] = []

    def first_only(index: int, head: bytes) -> bytes | None:
        heads.append(head)
        return pattern_response(head) if index == 0 else None

    with tcp_server(serve_requests(first_only)) as fake:
        results = list(fetch_keepalive(fake, 5000, timeout=10, requests=3))
    assert all(r.ok and r.bytes == 5000 for r in results), results
    assert [r.index_on_conn for r in results] == [0, 0, 0]
    assert results[0].detail is None
    assert all(r.detail is not None and "sent again" in r.detail for r in results[1:])
    assert len(heads) == 5  # 3 answered, 2 dropped


def test_a_new_connection_closed_unanswered_is_a_failure_not_retried() -> None:
    with tcp_server(serve_requests(lambda index, head: None)) as fake:
        (result,) = fetch_keepalive(fake, 5000, timeout=10, requests=1)
    assert (result.ok, result.error, result.response_time_s) == (False, "short", None)


def test_bytes_beyond_a_kept_response_are_corrupt() -> None:
    def too_long(index: int, head: bytes) -> bytes | None:
        return pattern_response(head) + b"extra"

    with tcp_server(serve_requests(too_long)) as fake:
        results = list(fetch_keepalive(fake, 1000, timeout=10, requests=2))
    assert [r.error for r in results] == ["corrupt", "corrupt"]


def test_a_chunked_response_is_refused_as_http() -> None:
    def chunked(index: int, head: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"

    with tcp_server(serve_requests(chunked)) as fake:
        (result,) = fetch_keepalive(fake, 0, timeout=10, requests=1)
    assert (result.ok, result.error) == (False, "http")


@pytest.mark.parametrize(
    ("status_line", "connection", "kept"),
    [
        ("HTTP/1.1 200 OK", None, True),
        ("HTTP/1.1 200 OK", "close", False),
        ("HTTP/1.1 200 OK", "Keep-Alive, Close", False),
        ("HTTP/1.0 200 OK", None, False),
        ("HTTP/1.0 200 OK", "keep-alive", True),
    ],
)
def test_persistence_follows_rfc_9112_section_9_3(
    status_line: str, connection: str | None, kept: bool
) -> None:
    head = status_line + "\r\nContent-Length: 0\r\n"
    if connection is not None:
        head += f"Connection: {connection}\r\n"
    parsed: ResponseHead = parse_response_head((head + "\r\n").encode())
    assert content_length(parsed.headers) == 0
    assert persistent(parsed) is kept


def test_through_an_http_proxy_requests_name_the_origin_in_absolute_form(
    origin: tuple[str, int],
) -> None:
    seen: list[str] = []
    host_port = f"{origin[0]}:{origin[1]}"
    with tcp_server(copying_http_proxy(seen)) as proxy:
        one = fetch(origin, 2 << 20, HttpProxy(*proxy), timeout=10)
        sent = upload(origin, 1 << 20, HttpProxy(*proxy), timeout=10)
    assert one.ok and sent.ok, (one, sent)
    assert (one.mode, sent.mode) == ("http-proxy", "http-proxy")
    assert seen == [
        f"GET http://{host_port}/bytes/{2 << 20} HTTP/1.0",
        f"POST http://{host_port}/sink HTTP/1.0",
    ]


def test_keepalive_through_an_http_proxy_keeps_one_connection_to_it(
    origin: tuple[str, int],
) -> None:
    seen: list[str] = []
    accepted: list[int] = []

    def counting(conn: socket.socket) -> None:
        accepted.append(1)
        copying_http_proxy(seen)(conn)

    with tcp_server(counting) as proxy:
        results = list(fetch_keepalive(origin, 1 << 20, HttpProxy(*proxy), 10, requests=4))
    assert all(r.ok and r.mode == "http-proxy" for r in results), results
    assert [r.index_on_conn for r in results] == [0, 1, 2, 3]
    assert len(accepted) == 1
    assert seen == [f"GET http://{origin[0]}:{origin[1]}/bytes/{1 << 20} HTTP/1.1"] * 4


@contextmanager
def tinyproxy(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Debian's tinyproxy on loopback, in the foreground, for one test."""
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed (make sysdeps)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 30\nLogLevel Warning\n")
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tinyproxy_ends_every_connection_after_one_response_and_the_next_request_reconnects(
    origin: tuple[str, int], tmp_path: Path
) -> None:
    # What the keep-alive experiment meets: tinyproxy 1.11 forwards an HTTP/1.1
    # response without "Connection: close" and then closes the connection.
    with tinyproxy(tmp_path) as proxy:
        results = list(fetch_keepalive(origin, 100_000, HttpProxy(*proxy), 10, requests=5))
    assert all(r.ok and r.bytes == 100_000 for r in results), results
    assert [r.index_on_conn for r in results] == [0] * 5
    assert all(r.setup_s is not None and r.setup_s > 0 for r in results)


def records_of(done: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_command_line_keepalive_reports_each_request_with_its_place_on_the_connection(
    origin: tuple[str, int],
) -> None:
    server = f"{origin[0]}:{origin[1]}"
    done = run_cli(
        *("--server", server, "--size", "1K", "--size", "100000", "--keepalive", "3"),
        *("--repeat", "2", "--concurrency", "2", "--warmup"),
    )
    assert done.returncode == 0, done.stderr
    records = records_of(done)
    assert len(records) == 2 * 2 * 2 * 3  # workers x rounds x sizes x requests
    for worker in (0, 1):
        mine = [r for r in records if r["worker"] == worker]
        assert [r["index_on_conn"] for r in mine] == [0, 1, 2] * 4
        assert [r["size"] for r in mine] == ([1024] * 3 + [100000] * 3) * 2
    assert all(r["ok"] for r in records)
    assert all((r["setup_s"] == 0) == (r["index_on_conn"] != 0) for r in records)
    assert "loadgen: 24 requests, 0 failed" in done.stderr and "8 connections" in done.stderr


def test_command_line_keepalive_through_an_http_proxy(origin: tuple[str, int]) -> None:
    seen: list[str] = []
    with tcp_server(copying_http_proxy(seen)) as proxy:
        done = run_cli(
            *("--server", f"{origin[0]}:{origin[1]}", "--size", "64K", "--keepalive", "4"),
            *("--http-proxy", f"{proxy[0]}:{proxy[1]}"),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    records = records_of(done)
    assert [(r["mode"], r["ok"], r["index_on_conn"]) for r in records] == [
        ("http-proxy", True, i) for i in range(4)
    ]
    assert len(seen) == 4


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--socks5", "127.0.0.1:1", "--http-proxy", "127.0.0.1:2"), "choose one"),
        (("--keepalive", "0"), "at least 1"),
        (("--keepalive", "2", "--upload"), "uploads go one per connection"),
        (("--http-proxy", "127.0.0.1:2", "--user", "u"), "need --socks5"),
    ],
)
def test_command_line_refuses_conflicting_options(args: Sequence[str], says: str) -> None:
    done = run_cli("--server", "127.0.0.1:1", "--size", "1K", *args)
    assert done.returncode == 2 and says in done.stderr, done.stderr
