"""The spliced HTTP/1.0 proxy (thesis Fig. 4.3) and its cache (thesis 4.4), without root.

The pure parts (request parsing, the origin-form rewrite, the cache policy and
the LRU) are tested directly; the proxy end to end runs as a subprocess
against test_socks5_spliced's fake splicing daemon, with a real TCP origin.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from daemon.api.client import SpliceClient
from daemon.api.protocol import Address
from proxies.http_cache import (
    CachedObject,
    ObjectCache,
    request_is_cacheable,
    response_is_storable,
)
from proxies.http_proxy import origin_request, parse_proxy_request, status_for_connect_error
from servers.http1 import HttpParseError
from tests.test_api_server import SILENT_HOST, UNREACHABLE_HOST
from tests.test_socks5_spliced import (
    ORIGIN,
    FakeDaemon,
    Origin,
    daemon,
    origin,
    payload,
    recv_to_eof,
    sha256,
    sock_dir,
    start_process,
    stop_process,
    wait_until,
)

__all__ = ["daemon", "sock_dir"]  # fixtures, re-exported for pytest

SERVICE: Address = ("192.0.2.1", 3128)


# -- request parsing and the rewrite (no I/O) ------------------------------------------------


def test_absolute_form_request_is_split_into_origin_and_path() -> None:
    request = parse_proxy_request(
        b"GET http://203.0.113.2:8080/bytes/10?x=1#frag HTTP/1.1\r\nUser-Agent: t\r\n\r\n"
    )
    assert (request.method, request.host, request.port) == ("GET", "203.0.113.2", 8080)
    assert request.path == "/bytes/10?x=1"
    assert request.authority == "203.0.113.2:8080"
    assert request.cache_key == "http://203.0.113.2:8080/bytes/10?x=1"


def test_default_port_empty_path_and_ipv6_literal() -> None:
    request = parse_proxy_request(b"GET http://[2001:db8::2] HTTP/1.0\r\n\r\n")
    assert (request.host, request.port, request.path) == ("2001:db8::2", 80, "/")
    assert request.authority == "[2001:db8::2]"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /bytes/10 HTTP/1.0\r\n\r\n", 400),  # origin-form: not for a proxy
        (b"CONNECT 203.0.113.2:443 HTTP/1.1\r\n\r\n", 501),
        (b"GET https://203.0.113.2/ HTTP/1.1\r\n\r\n", 501),
        (b"GET http://203.0.113.2/ HTTP/2.0\r\n\r\n", 505),
        (b"GET http://203.0.113.2/\r\n\r\n", 400),  # HTTP/0.9 simple request
        (b"GET http://203.0.113.2:99999/ HTTP/1.0\r\n\r\n", 400),
        (b"GET http://user@203.0.113.2/ HTTP/1.0\r\n\r\n", 400),
        (b"GET http://203.0.113.2/ HTTP/1.0\r\nno colon\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
    ],
)
def test_bad_requests_name_their_status(head: bytes, status: int) -> None:
    with pytest.raises(HttpParseError) as caught:
        parse_proxy_request(head)
    assert caught.value.status == status


def test_rewrite_is_origin_form_with_host_and_without_hop_by_hop_fields() -> None:
    request = parse_proxy_request(
        b"GET http://203.0.113.2/a?b HTTP/1.1\r\n"
        b"Host: wrong.example\r\nUser-Agent: t\r\nProxy-Connection: keep-alive\r\n"
        b"Connection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: 5\r\n"
        b"Proxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n"
    )
    assert origin_request(request) == (
        b"GET /a?b HTTP/1.0\r\nHost: 203.0.113.2\r\nUser-Agent: t\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n"
    )


def test_connect_errors_map_to_bad_gateway_or_gateway_timeout() -> None:
    assert status_for_connect_error("ETIMEDOUT") == 504
    for code in ("ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "ELIMIT"):
        assert status_for_connect_error(code) == 502


# -- the cache policy and the LRU (no I/O) -------------------------------------------------------


def test_only_plain_gets_are_answered_from_the_cache() -> None:
    assert request_is_cacheable("GET", {})
    assert not request_is_cacheable("HEAD", {})
    assert not request_is_cacheable("POST", {})
    assert not request_is_cacheable("GET", {"authorization": "Basic eA=="})
    assert not request_is_cacheable("GET", {"cache-control": "no-cache"})
    assert not request_is_cacheable("GET", {"pragma": "no-cache"})


@pytest.mark.parametrize(
    ("status", "headers", "store"),
    [
        (200, {"content-length": "10"}, True),
        (200, {"content-length": "10", "cache-control": "public, max-age=60"}, True),
        (200, {"content-length": "10", "cache-control": "no-store"}, False),
        (200, {"content-length": "10", "cache-control": "Private"}, False),
        (200, {"content-length": "10", "cache-control": "no-cache"}, False),
        (200, {"content-length": "10", "cache-control": "max-age=0"}, False),
        (200, {"content-length": "10", "pragma": "no-cache"}, False),
        (200, {"content-length": "10", "vary": "Accept"}, False),
        (200, {"content-length": "10", "set-cookie": "a=b"}, False),
        (200, {}, False),  # no length: a cut-off body would look complete
        (200, {"content-length": "101"}, False),  # over the object limit
        (404, {"content-length": "10"}, False),
    ],
)
def test_what_may_be_stored(status: int, headers: dict[str, str], store: bool) -> None:
    assert response_is_storable(status, headers, max_object=100).store is store


def _obj(size: int, expires: float | None = None) -> CachedObject:
    return CachedObject(bytes(size), "application/octet-stream", expires)


def test_lru_evicts_least_recently_used_until_the_new_object_fits() -> None:
    cache = ObjectCache(max_object=1000, max_bytes=2500)
    for key in ("a", "b", "c"):
        assert cache.put(key, _obj(800))
    assert cache.get("a", now=0) is not None  # a is now the most recently used
    assert cache.put("d", _obj(1000))  # 3400 > 2500: b and then c go
    assert cache.keys() == ["a", "d"] and cache.size == 1800
    assert not cache.put("e", _obj(1001))  # over the object limit: never stored
    assert cache.keys() == ["a", "d"]


def test_replacing_an_object_counts_its_size_once() -> None:
    cache = ObjectCache(max_object=1000, max_bytes=1000)
    cache.put("a", _obj(600))
    cache.put("a", _obj(700))
    assert cache.size == 700 and len(cache) == 1


def test_stale_objects_are_dropped_on_lookup() -> None:
    cache = ObjectCache(max_object=100, max_bytes=100)
    cache.put("a", _obj(10, expires=5.0))
    assert cache.get("a", now=4.9) is not None
    assert cache.get("a", now=5.0) is None
    assert "a" not in cache and cache.size == 0


# -- end to end over the fake splicing daemon ----------------------------------------------------


class HttpOrigin:
    """Serves /bytes/N (cacheable), /nostore/N and POST /post (sha256 of the body); logs heads."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.finished: list[str] = []  # paths whose exchange ended with the peer's EOF
        self.lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        with self.lock:
            self.heads.append(head)
        path = head.split(b" ")[1].decode()
        extra = ""
        if path.startswith("/post"):
            length = int(header(head, b"content-length"))
            while len(body) < length:
                body += conn.recv(65536)
            content = sha256(body).encode()
        else:
            size = int(path.rsplit("/", 1)[1])
            content = payload(size, 7)
            if path.startswith("/nostore/"):
                extra = "Cache-Control: no-store\r\n"
        conn.sendall(
            f"HTTP/1.0 200 OK\r\nContent-Type: application/x-test\r\n{extra}"
            f"Content-Length: {len(content)}\r\n\r\n".encode()
            + content
        )
        conn.shutdown(socket.SHUT_WR)
        # The proxy closes a fill connection only after storing the object, so
        # the peer's EOF here means the cache has it (or decided against it).
        with contextlib.suppress(ConnectionResetError):  # a fill that stores nothing stops reading
            recv_to_eof(conn)
        with self.lock:
            self.finished.append(path)

    def requests(self, path: str) -> list[bytes]:
        with self.lock:
            return [h for h in self.heads if h.split(b" ")[1] == path.encode()]


def header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    raise AssertionError(f"no {name!r} in {head!r}")


@contextlib.contextmanager
def running_proxy(daemon: FakeDaemon, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    process = start_process(
        "proxies.http_proxy", daemon.path, "--listen", f"{SERVICE[0]}:{SERVICE[1]}", *extra
    )
    try:
        yield process
    finally:
        assert stop_process(process) == 0


@pytest.fixture
def clients(daemon: FakeDaemon) -> Iterator[SpliceClient]:
    with SpliceClient(daemon.path) as api:
        yield api


@pytest.fixture
def http_origin(daemon: FakeDaemon) -> Iterator[tuple[HttpOrigin, Origin]]:
    handler = HttpOrigin()
    with origin(daemon, handler) as server:
        yield handler, server


def fetch(api: SpliceClient, request: bytes) -> tuple[bytes, bytes]:
    """(head, body) of the response to ``request`` through the proxy."""
    conn = api.connect(SERVICE)
    with conn:
        conn.settimeout(30)
        conn.sendall(request)
        conn.shutdown()
        response = recv_to_eof(conn.sock)
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def get(api: SpliceClient, path: str) -> tuple[bytes, bytes]:
    target = f"http://{ORIGIN[0]}{path}"
    return fetch(api, f"GET {target} HTTP/1.1\r\nUser-Agent: test\r\n\r\n".encode())


def is_hit(head: bytes) -> bool:
    return b"\r\nX-Cache: HIT" in head


def test_miss_is_spliced_then_filled_and_the_next_request_is_a_hit(
    daemon: FakeDaemon, clients: SpliceClient, http_origin: tuple[HttpOrigin, Origin]
) -> None:
    handler, _ = http_origin
    with running_proxy(daemon):
        head, body = get(clients, "/bytes/1000")
        assert head.startswith(b"HTTP/1.0 200 OK") and not is_hit(head)
        assert sha256(body) == sha256(payload(1000, 7))
        # The client's request, rewritten, then the proxy's own fetch for the cache.
        assert wait_until(lambda: len(handler.requests("/bytes/1000")) == 2)
        spliced, filled = handler.requests("/bytes/1000")
        assert spliced.startswith(b"GET /bytes/1000 HTTP/1.0\r\n")
        assert header(spliced, b"host") == ORIGIN[0].encode()
        assert header(spliced, b"user-agent") == b"test"
        assert header(spliced, b"connection") == b"close"
        assert b"User-Agent" not in filled
        [record] = daemon.splices()
        assert record.done.wait(10)
        assert record.length == 0 and record.written_after_splice == 0
        assert record.extra_to_client == 0 and record.written_to_server_fd == 0
        wait_for_fill(handler, "/bytes/1000", 2)

        head, body = get(clients, "/bytes/1000")
        assert head.startswith(b"HTTP/1.0 200 OK") and is_hit(head)
        assert header(head, b"content-length") == b"1000"
        assert header(head, b"content-type") == b"application/x-test"
        assert sha256(body) == sha256(payload(1000, 7))
    assert len(handler.requests("/bytes/1000")) == 2  # the hit never reached the origin
    assert len(daemon.splices()) == 1


def wait_for_fill(handler: HttpOrigin, path: str, count: int) -> None:
    """Until ``count`` exchanges for ``path`` (the spliced ones and the fills) have ended."""
    assert wait_until(lambda: handler.finished.count(path) == count)


def test_no_store_responses_are_never_served_from_the_cache(
    daemon: FakeDaemon, clients: SpliceClient, http_origin: tuple[HttpOrigin, Origin]
) -> None:
    handler, _ = http_origin
    with running_proxy(daemon):
        for round_ in range(2):
            head, body = get(clients, "/nostore/500")
            assert not is_hit(head) and len(body) == 500
            wait_for_fill(handler, "/nostore/500", 2 * (round_ + 1))  # spliced + fill, each time
    assert len(daemon.splices()) == 2


def test_objects_over_the_object_limit_are_not_cached(
    daemon: FakeDaemon, clients: SpliceClient, http_origin: tuple[HttpOrigin, Origin]
) -> None:
    handler, _ = http_origin
    with running_proxy(daemon, "--cache-max-object", "999"):
        get(clients, "/bytes/1000")
        wait_for_fill(handler, "/bytes/1000", 2)
        head, _ = get(clients, "/bytes/1000")
        assert not is_hit(head)
        wait_for_fill(handler, "/bytes/1000", 4)


def test_least_recently_used_object_is_evicted_by_size(
    daemon: FakeDaemon, clients: SpliceClient, http_origin: tuple[HttpOrigin, Origin]
) -> None:
    handler, _ = http_origin
    with running_proxy(daemon, "--cache-max-bytes", "2500"):
        for size in (1000, 1001, 1002):  # the third evicts the first
            get(clients, f"/bytes/{size}")
            wait_for_fill(handler, f"/bytes/{size}", 2)
        assert is_hit(get(clients, "/bytes/1001")[0])
        assert is_hit(get(clients, "/bytes/1002")[0])
        head, body = get(clients, "/bytes/1000")
        assert not is_hit(head) and sha256(body) == sha256(payload(1000, 7))
        wait_for_fill(handler, "/bytes/1000", 4)  # asked again, and filled again


def test_post_body_is_left_to_the_splice_and_reaches_the_origin(
    daemon: FakeDaemon, clients: SpliceClient, http_origin: tuple[HttpOrigin, Origin]
) -> None:
    handler, _ = http_origin
    body = payload(100_000, 9)
    request_head = f"POST http://{ORIGIN[0]}/post HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n"
    with running_proxy(daemon):
        _, answer = fetch(clients, request_head.encode() + body)
        assert answer == sha256(body).encode()
    [record] = daemon.splices()
    assert record.proxy_read == len(request_head)  # the head, not one byte of the body
    assert len(handler.requests("/post")) == 1  # POST is not cached: no fill


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /bytes/10 HTTP/1.0\r\n\r\n", 400),
        (b"CONNECT 203.0.113.2:443 HTTP/1.1\r\n\r\n", 501),
        (b"GET ftp://203.0.113.2/x HTTP/1.0\r\n\r\n", 501),
        (b"GET http://203.0.113.2/ HTTP/3.0\r\n\r\n", 505),
        (b"GET http://" + b"a" * 20000 + b" HTTP/1.0\r\n\r\n", 431),
    ],
)
def test_bad_requests_get_their_status_and_the_proxy_keeps_serving(
    daemon: FakeDaemon,
    clients: SpliceClient,
    http_origin: tuple[HttpOrigin, Origin],
    request_bytes: bytes,
    status: int,
) -> None:
    handler, _ = http_origin
    with running_proxy(daemon):
        head, body = fetch(clients, request_bytes)
        assert head.startswith(f"HTTP/1.0 {status} ".encode()), head
        assert body.startswith(str(status).encode())
        assert int(header(head, b"content-length")) == len(body)
        head, _ = get(clients, "/bytes/10")
        assert head.startswith(b"HTTP/1.0 200 OK")
        wait_for_fill(handler, "/bytes/10", 2)
    assert len(daemon.splices()) == 1


@pytest.mark.parametrize(
    ("host", "status"),
    [("203.0.113.3", 502), (UNREACHABLE_HOST, 502), (SILENT_HOST, 504)],
)
def test_connect_failures_are_bad_gateway_or_gateway_timeout(
    daemon: FakeDaemon, clients: SpliceClient, host: str, status: int
) -> None:
    with running_proxy(daemon):
        head, body = fetch(clients, f"GET http://{host}/x HTTP/1.0\r\n\r\n".encode())
        assert head.startswith(f"HTTP/1.0 {status} ".encode()), head
        assert len(body) == int(header(head, b"content-length"))
    assert daemon.splices() == []
    assert wait_until(lambda: "INTENDED" not in daemon.conn_states())
