"""servers.origin as a process on loopback, driven by http.client, curl and raw sockets."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import h11
import pytest

from servers.origin import HashBody, Refuse, SendPattern, ServeStats, route
from servers.pattern import PatternVerifier, pattern_bytes, pattern_chunks
from tests.sockutil import other_threads, signal_thread, wait_until

REPO = Path(__file__).resolve().parent.parent
SEED = 3


@dataclass(slots=True)
class Origin:
    process: subprocess.Popen[str]
    http: tuple[str, int]
    sink: tuple[str, int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_origin(*extra: str) -> Origin:
    http_port, sink_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "servers.origin",
            "--listen",
            f"127.0.0.1:{http_port}",
            "--sink-listen",
            f"127.0.0.1:{sink_port}",
            "--seed",
            str(SEED),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # EOF ("") if the server died instead
    if line != "ready\n":
        process.kill()
        _, err = process.communicate(timeout=10)
        pytest.fail(f"origin did not start: {line!r} {err}")
    return Origin(process, ("127.0.0.1", http_port), ("127.0.0.1", sink_port))


def stop_origin(origin: Origin) -> int:
    if origin.process.poll() is None:
        origin.process.send_signal(signal.SIGTERM)
    try:
        return origin.process.wait(timeout=10)
    finally:
        if origin.process.poll() is None:
            origin.process.kill()
            origin.process.wait()
        for stream in (origin.process.stdout, origin.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = start_origin("--quiet")
    try:
        yield server
    finally:
        assert stop_origin(server) == 0, "SIGTERM must end the origin with status 0"


def get(origin: Origin, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*origin.http, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def download_and_verify(origin: Origin, size: int) -> PatternVerifier:
    conn = http.client.HTTPConnection(*origin.http, timeout=30)
    try:
        conn.request("GET", f"/bytes/{size}")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(size)
        verifier = PatternVerifier(SEED, digest=False)
        while chunk := response.read(1 << 20):
            verifier.feed(chunk)
        return verifier
    finally:
        conn.close()


def get_stats(origin: Origin) -> dict[str, object]:
    status, body = get(origin, "/stats")
    assert status == 200
    stats: dict[str, object] = json.loads(body)
    return stats


def raw_exchange(address: tuple[str, int], data: bytes, half_close: bool = True) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while chunk := sock.recv(65536):
            reply += chunk
        return bytes(reply)


# --- routing, no I/O -------------------------------------------------------------


def parse_request(head: bytes) -> h11.Request:
    """The request h11 parses from ``head``, as the server's connection sees it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event


def test_route_maps_requests_to_actions() -> None:
    def action(head: bytes) -> object:
        return route(parse_request(head))

    assert action(b"GET /bytes/42 HTTP/1.0\r\n\r\n") == SendPattern(42)
    assert action(b"GET /bytes/42?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == SendPattern(42)
    assert action(b"HEAD /bytes/42 HTTP/1.1\r\nHost: a\r\n\r\n") == SendPattern(42)
    assert action(b"POST /sink HTTP/1.0\r\nContent-Length: 9\r\n\r\n") == HashBody()
    assert action(b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        HashBody()
    )
    # Only HTTP/1.0 has bodies that end with the close (RFC 9112 section 6.3).
    assert action(b"POST /sink HTTP/1.0\r\n\r\n") == HashBody(until_fin=True)
    assert action(b"POST /sink HTTP/1.1\r\nHost: a\r\n\r\n") == HashBody()
    assert action(b"GET /stats HTTP/1.1\r\nHost: a\r\n\r\n") == ServeStats()
    refused = action(b"POST /bytes/1 HTTP/1.0\r\n\r\n")
    assert isinstance(refused, Refuse) and refused.status == 405 and refused.allow == "GET, HEAD"
    refused = action(b"GET /bytes/-1 HTTP/1.0\r\n\r\n")
    assert isinstance(refused, Refuse) and refused.status == 400
    refused = action(b"GET /index.html HTTP/1.0\r\n\r\n")
    assert isinstance(refused, Refuse) and refused.status == 404 and not refused.close
    refused = action(b"GET /bytes/1 HTTP/2.0\r\n\r\n")
    assert isinstance(refused, Refuse) and refused.status == 505 and refused.close


# --- downloads --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1024, 1 << 20])
def test_get_bytes_returns_exactly_the_pattern(origin: Origin, size: int) -> None:
    status, body = get(origin, f"/bytes/{size}")
    assert status == 200
    assert body == pattern_bytes(SEED, size)


@pytest.mark.slow
def test_get_64_megabytes_is_verified_byte_for_byte(origin: Origin) -> None:
    size = 64 << 20
    started = time.perf_counter()
    verifier = download_and_verify(origin, size)
    elapsed = time.perf_counter() - started
    assert verifier.offset == size
    assert verifier.ok, f"first bad byte at {verifier.first_bad_offset}"
    print(f"64 MiB loopback download: {size / elapsed / 1e6:.0f} MB/s")


def test_concurrent_clients_each_get_their_own_correct_stream(origin: Origin) -> None:
    sizes = [(i + 1) * 512 * 1024 + i for i in range(8)]
    outcomes: dict[int, PatternVerifier | BaseException] = {}

    def client(size: int) -> None:
        try:
            outcomes[size] = download_and_verify(origin, size)
        except BaseException as e:
            outcomes[size] = e

    threads = [threading.Thread(target=client, args=(size,)) for size in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for size in sizes:
        verifier = outcomes[size]
        assert isinstance(verifier, PatternVerifier), verifier
        assert verifier.ok and verifier.offset == size


def test_an_idle_connection_does_not_hold_up_other_clients(origin: Origin) -> None:
    with socket.create_connection(origin.http, timeout=10):
        status, body = get(origin, "/bytes/100")
    assert status == 200 and body == pattern_bytes(SEED, 100)


# --- sinks ------------------------------------------------------------------------


def test_post_sink_answers_the_sha256_of_an_8_megabyte_body(origin: Origin) -> None:
    body = pattern_bytes(SEED + 1, 8 << 20)
    conn = http.client.HTTPConnection(*origin.http, timeout=30)
    try:
        conn.request("POST", "/sink", body=body, headers={"Content-Length": str(len(body))})
        response = conn.getresponse()
        assert response.status == 200
        assert response.read().decode().strip() == hashlib.sha256(body).hexdigest()
    finally:
        conn.close()


def test_post_sink_without_content_length_reads_to_the_clients_fin(origin: Origin) -> None:
    body = b"half-close framed body " * 1000
    reply = raw_exchange(origin.http, b"POST /sink HTTP/1.0\r\n\r\n" + body)
    head, _, answer = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert answer.decode().strip() == hashlib.sha256(body).hexdigest()


def test_raw_sink_answers_after_the_half_close(origin: Origin) -> None:
    body = b"".join(pattern_chunks(SEED, 3 << 20))
    assert raw_exchange(origin.sink, body) == (hashlib.sha256(body).hexdigest() + "\n").encode()


def test_raw_sink_waits_for_the_fin_before_answering(origin: Origin) -> None:
    with socket.create_connection(origin.sink, timeout=10) as sock:
        sock.sendall(b"abc")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # no FIN yet, so no answer yet
        sock.settimeout(10)
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(100)
    assert reply == (hashlib.sha256(b"abc").hexdigest() + "\n").encode()


# --- bad requests -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET /bytes/12x HTTP/1.0\r\n\r\n", 400),
        (b"GET /bytes/1 HTTP/2.0\r\n\r\n", 505),
        (b"GET /nothing HTTP/1.0\r\n\r\n", 404),
        (b"DELETE /bytes/1 HTTP/1.0\r\n\r\n", 405),
        (b"GET /sink HTTP/1.0\r\n\r\n", 405),
        (b"POST /sink HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET /bytes/1 HTTP/1.0\r\nno colon here\r\n\r\n", 400),
        (b"GET /bytes/1 HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host (RFC 9112 3.2)
        (b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /bytes/1 HTTP/1.0\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_bad_request_gets_an_error_and_the_server_carries_on(
    origin: Origin, request_bytes: bytes, status: int
) -> None:
    # half_close=False: the server closes after the answer on its own.
    reply = raw_exchange(origin.http, request_bytes, half_close=False)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:80]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert get(origin, "/bytes/10") == (200, pattern_bytes(SEED, 10))


def test_client_closing_mid_head_does_not_stop_the_server(origin: Origin) -> None:
    raw_exchange(origin.http, b"GET /bytes/1", half_close=True)
    assert get(origin, "/bytes/10") == (200, pattern_bytes(SEED, 10))


# --- persistent connections (HTTP/1.1) ------------------------------------------------


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


def read_reply(stream: BinaryIO, *, head_only: bool = False) -> Reply:
    """One response from a connection's read stream, leaving the next one in it."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_only or status == 100 else int(headers["content-length"])
    body = stream.read(length)
    assert len(body) == length, f"body ended after {len(body)} of {length} bytes"
    return Reply(status, headers, body)


def get_request(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: origin", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_http_client_reuses_one_connection_for_several_requests(origin: Origin) -> None:
    conn = http.client.HTTPConnection(*origin.http, timeout=30)
    try:
        conn.connect()
        first_socket = conn.sock
        for size in [1000, 0, 1 << 20, 7, 3 << 20]:
            conn.request("GET", f"/bytes/{size}")
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Connection") is None  # no close announced
            assert sha(response.read()) == sha(pattern_bytes(SEED, size))
            assert conn.sock is first_socket, "http.client had to reconnect"
    finally:
        conn.close()
    stats = get_stats(origin)
    assert stats["requests"] == 5
    assert stats["connections"] == 2  # the five requests' and this one's


def test_three_pipelined_gets_in_one_send_are_answered_in_order(origin: Origin) -> None:
    sizes = [3000, 1 << 20, 17]
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(b"".join(get_request(f"/bytes/{size}") for size in sizes))
        stream = sock.makefile("rb")
        for size in sizes:
            reply = read_reply(stream)
            assert reply.status == 200
            assert reply.headers["content-length"] == str(size)
            assert sha(reply.body) == sha(pattern_bytes(SEED, size))
        # Still open: one more request, the last one.
        sock.sendall(get_request("/bytes/5", "Connection: close"))
        assert read_reply(stream).body == pattern_bytes(SEED, 5)
        assert stream.read() == b""


def test_head_gets_the_get_head_without_a_body(origin: Origin) -> None:
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(
            b"HEAD /bytes/5000 HTTP/1.1\r\nHost: origin\r\n\r\n" + get_request("/bytes/10")
        )
        stream = sock.makefile("rb")
        head = read_reply(stream, head_only=True)
        assert head.status == 200 and head.headers["content-length"] == "5000"
        # The GET's status line follows the HEAD's head directly: no body came between.
        assert read_reply(stream).body == pattern_bytes(SEED, 10)


def test_connection_close_from_the_client_closes_after_the_response(origin: Origin) -> None:
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(get_request("/bytes/100", "Connection: close"))
        stream = sock.makefile("rb")
        reply = read_reply(stream)
        assert reply.headers["connection"] == "close"
        assert reply.body == pattern_bytes(SEED, 100)
        assert stream.read() == b""  # the server's FIN, though we never half-closed


@pytest.mark.parametrize("connection", ["", "Connection: keep-alive\r\n"])
def test_an_http10_request_still_closes_after_the_response(origin: Origin, connection: str) -> None:
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(f"GET /bytes/100 HTTP/1.0\r\n{connection}\r\n".encode())
        stream = sock.makefile("rb")
        reply = read_reply(stream)
        assert reply.headers["connection"] == "close"
        assert reply.body == pattern_bytes(SEED, 100)
        assert stream.read() == b""


def test_a_chunked_post_sink_is_hashed_and_the_connection_carries_on(origin: Origin) -> None:
    chunks = [pattern_bytes(SEED + 1, 100_000), b"x", pattern_bytes(SEED + 2, 70_000)]
    conn = http.client.HTTPConnection(*origin.http, timeout=30)
    try:
        conn.request("POST", "/sink", body=iter(chunks), encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200
        assert response.read().decode().strip() == sha(b"".join(chunks))
        conn.request("GET", "/bytes/10")
        assert conn.getresponse().read() == pattern_bytes(SEED, 10)
    finally:
        conn.close()


def test_a_large_post_and_the_get_pipelined_behind_it_share_the_connection(
    origin: Origin,
) -> None:
    # Most of this body is read around h11 (servers.origin._hash_request_body);
    # the GET right behind it must still be found.
    body = pattern_bytes(SEED + 1, 3 << 20)
    head = f"POST /sink HTTP/1.1\r\nHost: origin\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(head.encode() + body + get_request("/bytes/3"))
        stream = sock.makefile("rb")
        assert read_reply(stream).body.decode().strip() == sha(body)
        assert read_reply(stream).body == pattern_bytes(SEED, 3)
        sock.sendall(head.encode() + body[:-1] + b"!")  # and once more, on the same connection
        assert read_reply(stream).body.decode().strip() == sha(body[:-1] + b"!")


def test_an_http11_post_sink_without_framing_has_an_empty_body(origin: Origin) -> None:
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(b"POST /sink HTTP/1.1\r\nHost: origin\r\n\r\n" + get_request("/bytes/3"))
        stream = sock.makefile("rb")
        assert read_reply(stream).body.decode().strip() == sha(b"")
        assert read_reply(stream).body == pattern_bytes(SEED, 3)


def test_expect_100_continue_is_answered_before_the_body_is_sent(origin: Origin) -> None:
    body = pattern_bytes(SEED + 1, 300_000)
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(
            b"POST /sink HTTP/1.1\r\nHost: origin\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        stream = sock.makefile("rb")
        assert read_reply(stream).status == 100  # before a single body byte
        sock.sendall(body)
        reply = read_reply(stream)
        assert reply.status == 200 and reply.body.decode().strip() == sha(body)


def test_a_refused_post_waiting_for_100_continue_gets_no_continue_and_a_close(
    origin: Origin,
) -> None:
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(
            b"POST /bytes/1 HTTP/1.1\r\nHost: origin\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        stream = sock.makefile("rb")
        reply = read_reply(stream)
        assert reply.status == 405 and reply.headers["connection"] == "close"
        assert stream.read() == b""


def test_a_refused_request_whose_body_has_arrived_keeps_the_connection(origin: Origin) -> None:
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(
            b"POST /nothing HTTP/1.1\r\nHost: origin\r\nContent-Length: 5\r\n\r\nhello"
            + get_request("/bytes/3")
        )
        stream = sock.makefile("rb")
        refused = read_reply(stream)
        assert refused.status == 404 and "connection" not in refused.headers
        assert read_reply(stream).body == pattern_bytes(SEED, 3)


def test_a_protocol_error_after_a_good_request_gets_400_and_a_close(origin: Origin) -> None:
    with socket.create_connection(origin.http, timeout=10) as sock:
        sock.sendall(get_request("/bytes/3") + b"garbage\r\n\r\n")
        stream = sock.makefile("rb")
        assert read_reply(stream).body == pattern_bytes(SEED, 3)
        refused = read_reply(stream)
        assert refused.status == 400 and refused.headers["connection"] == "close"
        assert stream.read() == b""


def test_stats_count_the_requests_and_connections_before_this_one(origin: Origin) -> None:
    get(origin, "/bytes/10")
    get(origin, "/bytes/10?again")
    get(origin, "/missing")
    assert get_stats(origin) == {
        "requests": 3,
        "by_path": {"/bytes/10": 2, "/missing": 1},
        "connections": 4,
    }
    stats = get_stats(origin)
    assert stats["requests"] == 4 and stats["by_path"] == {
        "/bytes/10": 2,
        "/missing": 1,
        "/stats": 1,
    }


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_fetches_two_urls_over_one_connection(origin: Origin, tmp_path: Path) -> None:
    base = f"http://{origin.http[0]}:{origin.http[1]}"
    first, second = tmp_path / "first", tmp_path / "second"
    urls = [f"{base}/bytes/1000", "-o", str(first), f"{base}/bytes/2000", "-o", str(second)]
    done = subprocess.run(
        ["curl", "-s", *urls, "-w", "%{num_connects}\\n"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]  # the second URL made no new connection
    assert first.read_bytes() == pattern_bytes(SEED, 1000)
    assert second.read_bytes() == pattern_bytes(SEED, 2000)
    assert get_stats(origin)["connections"] == 2


# --- process behaviour --------------------------------------------------------------


def test_port_already_taken_exits_non_zero_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "servers.origin", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode != 0
    assert done.stdout == ""  # never claimed to be ready
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "in use" in done.stderr


def free_port6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port: int = s.getsockname()[1]
        return port


def test_more_listen_addresses_serve_both_families() -> None:
    """``--listen`` and ``--sink-listen`` again: the testbed's dual-stack origin."""
    http6, sink6 = free_port6(), free_port6()
    server = start_origin("--listen", f"[::1]:{http6}", "--sink-listen", f"[::1]:{sink6}")
    try:
        assert get(server, "/bytes/100")[1] == pattern_bytes(SEED, 100)
        six = Origin(server.process, ("::1", http6), ("::1", sink6))
        assert get(six, "/bytes/100")[1] == pattern_bytes(SEED, 100)
        with socket.create_connection(("::1", sink6), timeout=10) as sink:
            sink.sendall(b"abc")
            sink.shutdown(socket.SHUT_WR)
            assert sink.recv(100).strip() == hashlib.sha256(b"abc").hexdigest().encode()
        server.process.send_signal(signal.SIGTERM)
        _, err = server.process.communicate(timeout=10)
    finally:
        assert stop_origin(server) == 0
    first = err.splitlines()[0]  # the banner names every address
    assert f"[::1]:{http6}" in first and f"[::1]:{sink6}" in first


def test_request_log_names_each_request_and_status() -> None:
    server = start_origin()
    get(server, "/bytes/5")
    get(server, "/missing")
    server.process.send_signal(signal.SIGTERM)
    _, err = server.process.communicate(timeout=10)
    assert server.process.returncode == 0
    # Each connection logs when it ends, so the two lines may come in either order.
    lines = [line for line in err.splitlines() if '"' in line]
    assert len(lines) == 2
    assert any('"GET /bytes/5 HTTP/1.1" 200 5 ' in line for line in lines), lines
    assert any('"GET /missing HTTP/1.1" 404 ' in line for line in lines), lines


def test_sigterm_taken_by_a_connection_thread_still_stops_the_server() -> None:
    """Linux may give a process-directed SIGTERM to any thread; the main one must still wake.

    CPython runs the handler in the main thread, blocked in a select without a
    timeout; found as a CI run where the origin ignored a SIGTERM (1 in ~200).
    """
    server = start_origin()
    with socket.create_connection(server.http, timeout=10) as idle:
        idle.sendall(b"GET /bytes/5 HTTP/1.1\r\nHost: o\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        # The keep-alive connection's thread now waits for the next request.
        assert wait_until(lambda: len(other_threads(server.process.pid)) == 1)
        [handler] = other_threads(server.process.pid)
        signal_thread(server.process.pid, handler, signal.SIGTERM)
        _, err = server.process.communicate(timeout=10)
        assert server.process.returncode == 0, err
        assert idle.recv(4096) == b""  # the idle connection was ended, not left open


def test_a_client_that_sends_nothing_is_closed_after_the_idle_timeout() -> None:
    server = start_origin("--idle-timeout", "0.3")
    try:
        with socket.create_connection(server.http, timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(100) == b""  # the server's FIN, not our 10 s timeout
            assert time.monotonic() - started < 5
    finally:
        server.process.send_signal(signal.SIGTERM)
        _, err = server.process.communicate(timeout=10)
    assert "[timeout]" in err


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    server = start_origin("--quiet", "--idle-timeout", "0.3")
    try:
        with socket.create_connection(server.http, timeout=10) as sock:
            sock.sendall(get_request("/bytes/10"))
            stream = sock.makefile("rb")
            assert read_reply(stream).body == pattern_bytes(SEED, 10)
            started = time.monotonic()
            assert stream.read() == b""  # the server's FIN, not our 10 s timeout
            assert time.monotonic() - started < 5
    finally:
        assert stop_origin(server) == 0


def test_sigterm_ends_idle_keep_alive_connections_at_once() -> None:
    server = start_origin("--quiet")
    with socket.create_connection(server.http, timeout=10) as sock:
        sock.sendall(get_request("/bytes/10"))
        stream = sock.makefile("rb")
        assert read_reply(stream).body == pattern_bytes(SEED, 10)
        started = time.monotonic()
        assert stop_origin(server) == 0
        # Not the 3 s grace for requests in flight: nothing was in flight.
        # (Under a loaded CI machine the exit alone took 2.1 s once: the
        # bound only has to tell the grace apart.)
        assert time.monotonic() - started < 2.9
        assert stream.read() == b""
