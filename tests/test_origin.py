"""servers.origin as a process on loopback, driven by http.client, curl and raw sockets."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest

from servers.origin import HashBody, Refuse, SendPattern, ServeStats, route
from servers.pattern import PatternVerifier, pattern_bytes, pattern_chunks

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
