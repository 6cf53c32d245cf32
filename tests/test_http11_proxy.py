"""The HTTP/1.1 proxy: persistent connections, each response body spliced.

The sans-I/O parts (targets, the deny list, the rewrites, RFC 9112 6.3's
framing, persistence, the tap's cache body) are tested without root; the
proxy end to end runs against the testbed's daemon and origin with curl
and raw sockets as clients, plus a small origin of the test's own for the
framings the testbed's origin never sends (chunked, close-delimited, a
kept-alive connection closed under the proxy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from proxies.http11_proxy import (
    BodyKind,
    BodyTap,
    DenyList,
    DenyRule,
    Origin,
    ResponseFraming,
    client_keeps_alive,
    cut_short,
    forward_request,
    forward_response,
    head_length,
    origin_keeps_alive,
    parse_authority,
    parse_target,
    proxy_response,
    request_has_body,
    response_framing,
    tapped_body,
)
from servers.http1 import HttpParseError
from tests.helpers import curl_sha256, daemon_stats, pattern_sha256, run_py

# -- targets (no I/O) ----------------------------------------------------------------------


def test_absolute_form_target_gives_origin_path_and_cache_key() -> None:
    target = parse_target(b"http://Example.ORG:8080/a/b?x=1#frag")
    assert target.origin == Origin("example.org", 8080)
    assert target.path == "/a/b?x=1"  # the fragment is never sent
    assert target.cache_key == "http://example.org:8080/a/b?x=1"


def test_default_port_empty_path_and_ipv6_literal() -> None:
    target = parse_target(b"http://[2001:db8::2]")
    assert target.origin == Origin("2001:db8::2", 80)
    assert (target.path, target.origin.authority) == ("/", "[2001:db8::2]")


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"/bytes/10", 400),  # origin-form: this is a forward proxy
        (b"*", 400),  # asterisk-form
        (b"example.org:80", 400),  # authority-form is for CONNECT only
        (b"https://203.0.113.2/", 501),
        (b"http://203.0.113.2:99999/", 400),
        (b"http://user@203.0.113.2/", 400),  # RFC 9110 4.2.4
        (b"http:///nohost", 400),
    ],
)
def test_targets_a_forward_proxy_refuses(target: bytes, status: int) -> None:
    with pytest.raises(HttpParseError) as caught:
        parse_target(target)
    assert caught.value.status == status


def test_connect_target_is_host_and_port() -> None:
    assert parse_authority(b"Example.org:443") == Origin("example.org", 443)
    assert parse_authority(b"[2001:db8::1]:8443") == Origin("2001:db8::1", 8443)
    for bad in (b"example.org", b"example.org:443/x", b"http://example.org:443", b":443"):
        with pytest.raises(HttpParseError) as caught:
            parse_authority(bad)
        assert caught.value.status == 400, bad


# -- the deny list (no I/O) ----------------------------------------------------------------

RULES = """
# hosts nobody may reach
blocked.example          # every path, and tunnels
203.0.113.2/private      # a path prefix on the testbed's origin
[2001:DB8::7]/admin
"""


def test_deny_rules_parse_with_comments_and_blank_lines() -> None:
    deny = DenyList.parse(RULES)
    assert deny.rules == (
        DenyRule("blocked.example"),
        DenyRule("203.0.113.2", "/private"),
        DenyRule("2001:db8::7", "/admin"),
    )
    assert str(deny.rules[2]) == "[2001:db8::7]/admin"


def test_a_host_rule_denies_every_path_and_tunnels_a_path_rule_only_its_prefix() -> None:
    deny = DenyList.parse(RULES)
    assert deny.match("blocked.example", "/") == DenyRule("blocked.example")
    assert deny.match("blocked.example", None) is not None  # CONNECT
    assert deny.match("203.0.113.2", "/private/x?y") is not None
    assert deny.match("203.0.113.2", "/privateer") is not None  # a prefix, as documented
    assert deny.match("203.0.113.2", "/bytes/10") is None
    assert deny.match("203.0.113.2", None) is None  # a tunnel's paths are unseen
    assert deny.match("2001:db8::7", "/admin") is not None
    assert deny.match("other.example", "/private") is None


@pytest.mark.parametrize(
    "line", ["two words", "http://blocked.example/", "/no-host", "[2001:db8::1", "[::1]x"]
)
def test_malformed_deny_rules_name_their_line(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        DenyList.parse("# first\n" + line)


# -- rewriting the request (no I/O) --------------------------------------------------------


def _request(head: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


def _fields(message: h11.Request | h11.Response | h11.InformationalResponse) -> list[bytes]:
    return [name + b": " + value for name, value in message.headers.raw_items()]


def test_request_goes_out_in_origin_form_without_hop_by_hop_fields_with_via() -> None:
    request = _request(
        b"GET http://203.0.113.2/a?b HTTP/1.1\r\nHost: wrong.example\r\nUser-Agent: t\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n"
    )
    out = forward_request(request, parse_target(request.target))
    assert (out.method, out.target, out.http_version) == (b"GET", b"/a?b", b"1.1")
    assert _fields(out) == [
        b"Host: 203.0.113.2",  # RFC 9112 3.2.2: the target's authority, not the client's Host
        b"User-Agent: t",
        b"Accept: */*",
        b"Via: 1.1 tcp-splice",
    ]
    assert not request_has_body(request)


def test_request_body_framing_is_restated_and_100_continue_stays_with_the_proxy() -> None:
    request = _request(
        b"POST http://203.0.113.2:8080/sink HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    out = forward_request(request, parse_target(request.target))
    assert _fields(out) == [
        b"Host: 203.0.113.2:8080",
        b"Content-Length: 5",
        b"Via: 1.1 tcp-splice",
    ]
    assert request_has_body(request)
    chunked = _request(
        b"POST http://h/sink HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert b"Transfer-Encoding: chunked" in _fields(
        forward_request(chunked, parse_target(b"http://h/"))
    )
    assert request_has_body(chunked)
    assert not request_has_body(
        _request(b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    )


def test_an_http10_request_is_forwarded_as_11_and_says_so_in_via() -> None:
    request = _request(b"GET http://203.0.113.2/ HTTP/1.0\r\n\r\n")
    out = forward_request(request, parse_target(request.target))
    assert out.http_version == b"1.1"
    assert _fields(out) == [b"Host: 203.0.113.2", b"Via: 1.0 tcp-splice"]


# -- the response: framing, persistence, rewriting (no I/O) ---------------------------------


def _response(head: bytes, method: bytes = b"GET") -> h11.Response:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"h")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Response)
    return event


@pytest.mark.parametrize(
    ("method", "status", "fields", "framing"),
    [
        (b"GET", 200, [(b"content-length", b"10")], ResponseFraming(BodyKind.LENGTH, 10)),
        (b"GET", 200, [(b"content-length", b"0")], ResponseFraming(BodyKind.LENGTH, 0)),
        (b"HEAD", 200, [(b"content-length", b"10")], ResponseFraming(BodyKind.NONE)),
        (b"GET", 204, [], ResponseFraming(BodyKind.NONE)),
        (b"GET", 304, [(b"content-length", b"10")], ResponseFraming(BodyKind.NONE)),
        (b"GET", 103, [], ResponseFraming(BodyKind.NONE)),
        (b"GET", 200, [(b"transfer-encoding", b"chunked")], ResponseFraming(BodyKind.CHUNKED)),
        # Transfer-Encoding wins over Content-Length (RFC 9112 6.3 rule 3).
        (
            b"GET",
            200,
            [(b"content-length", b"10"), (b"transfer-encoding", b"chunked")],
            ResponseFraming(BodyKind.CHUNKED),
        ),
        (b"GET", 200, [(b"transfer-encoding", b"gzip")], ResponseFraming(BodyKind.UNTIL_CLOSE)),
        (b"GET", 200, [], ResponseFraming(BodyKind.UNTIL_CLOSE)),
        (
            b"GET",
            200,
            [(b"content-length", b"7"), (b"content-length", b"7")],
            ResponseFraming(BodyKind.LENGTH, 7),
        ),
    ],
)
def test_response_framing_follows_rfc9112_6_3(
    method: bytes, status: int, fields: list[tuple[bytes, bytes]], framing: ResponseFraming
) -> None:
    assert response_framing(method, status, fields) == framing


def test_conflicting_content_lengths_are_a_bad_gateway() -> None:
    with pytest.raises(HttpParseError) as caught:
        response_framing(b"GET", 200, [(b"content-length", b"7"), (b"content-length", b"8")])
    assert caught.value.status == 502


def test_who_keeps_the_connection_alive() -> None:
    assert client_keeps_alive(_request(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert not client_keeps_alive(
        _request(b"GET http://h/ HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n")
    )
    # HTTP/1.0 keep-alive is not honoured: the proxy closes after answering.
    assert not client_keeps_alive(
        _request(b"GET http://h/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    )
    length = ResponseFraming(BodyKind.LENGTH, 3)
    assert origin_keeps_alive(_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"), length)
    closing = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n")
    assert not origin_keeps_alive(closing, length)
    assert not origin_keeps_alive(
        _response(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n"), length
    )
    until_close = _response(b"HTTP/1.1 200 OK\r\n\r\n")
    assert not origin_keeps_alive(until_close, ResponseFraming(BodyKind.UNTIL_CLOSE))


def test_response_head_loses_hop_by_hop_fields_and_gains_via() -> None:
    response = _response(
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Length: 3\r\nConnection: X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-End: 2\r\n\r\n"
    )
    out = forward_response(response, ResponseFraming(BodyKind.LENGTH, 3), close=False)
    assert isinstance(out, h11.Response)
    assert (out.status_code, out.reason) == (200, b"OK")
    assert _fields(out) == [
        b"Content-Type: a/b",
        b"Content-Length: 3",
        b"X-End: 2",
        b"Via: 1.1 tcp-splice",
    ]
    closing = forward_response(response, ResponseFraming(BodyKind.LENGTH, 3), close=True)
    assert _fields(closing)[-1] == b"Connection: close"


def test_a_copied_body_loses_its_framing_fields_for_h11_to_restate() -> None:
    response = _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n")
    out = forward_response(response, ResponseFraming(BodyKind.CHUNKED), close=False)
    assert _fields(out) == [b"X-A: 1", b"Via: 1.1 tcp-splice"]
    # A HEAD response keeps its Content-Length: it describes the GET's body (RFC 9110 8.6).
    head = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", method=b"HEAD")
    out = forward_response(head, ResponseFraming(BodyKind.NONE), close=False)
    assert b"Content-Length: 99" in _fields(out)


def test_the_proxys_own_answers_have_a_length_and_no_body_for_head() -> None:
    full = proxy_response(403, "denied", close=False)
    head, _, body = full.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert f"Content-Length: {len(body)}".encode() in head and b"Connection" not in head
    only_head = proxy_response(403, "denied", head_only=True, close=True)
    assert only_head == head + b"\r\nConnection: close\r\n\r\n"  # same length, no body


def test_head_length_ends_where_h11_ends_a_head() -> None:
    assert head_length(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody") == len(
        b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
    )
    assert head_length(b"HTTP/1.1 200 OK\nA: b\n\nbody") == len(b"HTTP/1.1 200 OK\nA: b\n\n")
    assert head_length(b"HTTP/1.1 200 OK\nA: b\n\r\nbody") == len(b"HTTP/1.1 200 OK\nA: b\n\r\n")
    assert head_length(b"HTTP/1.1 200 OK\r\nA: b\r\n") == -1


# -- the tap's copy for the cache (no I/O) -----------------------------------------------


def test_the_cache_gets_what_the_proxy_wrote_plus_what_the_tap_saw() -> None:
    tap = BodyTap(limit=100)
    tap(b"bcd")
    tap(b"ef")
    assert tapped_body(b"a", tap, {"tapped": 5, "tap_overflow": False}, 6) == b"abcdef"


@pytest.mark.parametrize(
    "result",
    [
        {"tapped": 5, "tap_overflow": True},  # the daemon stopped the tap early
        {"tapped": 4, "tap_overflow": False},  # the count does not match what arrived
        {},  # no tap at all (a daemon without it)
    ],
)
def test_an_incomplete_tap_stores_nothing(result: dict[str, object]) -> None:
    tap = BodyTap(limit=100)
    tap(b"bcdef")
    assert tapped_body(b"a", tap, result, 6) is None


def test_the_tap_gives_up_past_the_object_limit_and_a_short_body_is_not_stored() -> None:
    tap = BodyTap(limit=4)
    tap(b"abc")
    tap(b"de")
    assert tap.overflow and tap.parts == []
    assert tapped_body(b"", tap, {"tapped": 5, "tap_overflow": False}, 5) is None
    short = BodyTap(limit=100)
    short(b"abc")
    assert tapped_body(b"", short, {"tapped": 3, "tap_overflow": False}, 5) is None


def test_a_tapped_splice_that_carried_less_than_its_limit_was_cut_short() -> None:
    assert cut_short({"tapped": 100_000, "tap_overflow": False}, 200_000) == 100_000
    assert cut_short({"tapped": 200_000, "tap_overflow": False}, 200_000) is None
    assert cut_short({"tapped": 5, "tap_overflow": True}, 200_000) is None  # no verdict
    assert cut_short({"bytes_s2c": 5}, 200_000) is None  # untapped: no verdict


# -- end to end in the testbed (root) ----------------------------------------------------

PROXY_PORT = 3130
DENY = """
# the test proxy's access rules
203.0.113.2/private
203.0.113.9
"""

# An origin for what servers.origin never sends, on port 8081 of the server host:
#   /chunked/N  N pattern bytes, chunked, with a trailer X-Sha256
#   /close/N    N pattern bytes, no length: the close ends them
#   /once/N     N pattern bytes with a Content-Length, then a close without
#               warning (a kept-alive connection the origin times out)
#   /lazy/N     N pattern bytes with a Content-Length; the connection's next
#               request is read and the connection closed unanswered (the
#               origin timed it out just as the proxy reused it)
#   /len/N      N pattern bytes with a Content-Length, kept alive
#   /short/N    a Content-Length of N, N // 2 bytes, then the close
SIDE_ORIGIN_PORT = 8081
SIDE_ORIGIN = r"""
import hashlib, socket, sys, threading
from servers.pattern import DEFAULT_SEED, pattern_chunks

def body(n):
    return b"".join(bytes(c) for c in pattern_chunks(DEFAULT_SEED, n))

def serve(c):
    buf = b""
    lazy = False
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            if lazy:
                return
            kind, n = head.split(b" ")[1].decode().split("/")[1:3]
            data = body(int(n))
            if kind == "chunked":
                out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sha256\r\n\r\n"
                for i in range(0, len(data), 7000):
                    piece = data[i : i + 7000]
                    out += b"%x\r\n" % len(piece) + piece + b"\r\n"
                sha = hashlib.sha256(data).hexdigest().encode()
                c.sendall(out + b"0\r\nX-Sha256: " + sha + b"\r\n\r\n")
            elif kind == "close":
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: x/y\r\n\r\n" + data)
                return
            elif kind == "short":
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
                c.sendall(data[: len(data) // 2])
                return
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
                if kind == "once":
                    return
                lazy = kind == "lazy"
    finally:
        c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(128)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class Bed:
    """The testbed, our proxy with a deny list on PROXY_PORT, and the side origin."""

    def __init__(self, tb: Any, workdir: Path) -> None:
        self.tb = tb
        self.workdir = workdir
        self.proxy_url = f"http://198.51.100.1:{PROXY_PORT}"
        self.origin = "http://{}:{}".format(*tb.origin)
        self.side = f"http://{tb.host('server').addr}:{SIDE_ORIGIN_PORT}"
        self.log = workdir / "proxy.log"
        self._n = 0

    def curl(self, urls: list[str], *extra: str) -> tuple[list[tuple[int, int]], list[Path]]:
        """One curl for all ``urls``: (num_connects, status) and the body file of each."""
        outs = []
        args = ["curl", "-sS", "--max-time", "60", "-x", self.proxy_url, *extra]
        for url in urls:
            self._n += 1
            out = self.workdir / f"body{self._n}"
            outs.append(out)
            args += [url, "-o", str(out)]
        res = self.tb.host("client").cmd(
            [*args, "-w", "%{num_connects} %{http_code}\n"], timeout=90
        )
        lines = [tuple(map(int, line.split())) for line in res.stdout.splitlines()]
        assert len(lines) == len(urls), (res.returncode, res.stdout, res.stderr)
        return lines, outs  # type: ignore[return-value]

    def origin_stats(self) -> dict[str, Any]:
        res = self.tb.host("client").cmd(["curl", "-sS", f"{self.origin}/stats"])
        return dict(json.loads(res.stdout))

    def handed_back(self) -> int:
        return int(daemon_stats(self.tb)["splice_counters"]["handed_back"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bed(tb: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    workdir = tmp_path_factory.mktemp("http11")
    deny = workdir / "deny.txt"
    deny.write_text(DENY)
    state = Bed(tb, workdir)
    server_host = tb.host("server")
    side = server_host.popen(
        [sys.executable, "-c", SIDE_ORIGIN, server_host.addr, str(SIDE_ORIGIN_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    log = state.log.open("w")
    proxy = tb.host("proxy").popen(
        [
            sys.executable,
            "-m",
            "proxies.http11_proxy",
            "--daemon",
            str(tb.daemon_socket),
            "--source",
            "198.51.100.1",
            "--listen",
            f"198.51.100.1:{PROXY_PORT}",
            "--deny",
            str(deny),
            "--log-level",
            "INFO",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert side.stdout is not None and side.stdout.readline().strip() == "ready"
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready", (
            state.log.read_text()
        )
        yield state
    finally:
        for process in (proxy, side):
            with contextlib.suppress(Exception):
                process.terminate()
                process.wait(10)
        log.close()


def _pattern(size: int) -> str:
    return pattern_sha256(size)


@pytest.mark.root
def test_ten_urls_on_one_connection_each_body_spliced_and_intact(bed: Bed) -> None:
    sizes = [1, 999, 1500, 4096, 65_536, 70_001, 100_003, 300_007, 1_048_583, 3_000_017]
    before, origin_before = bed.handed_back(), bed.origin_stats()
    results, bodies = bed.curl([f"{bed.origin}/bytes/{n}" for n in sizes])
    assert [code for _, code in results] == [200] * 10
    assert sum(connects for connects, _ in results) == 1  # one connection for all ten
    for size, path in zip(sizes, bodies, strict=True):
        assert _sha(path) == _pattern(size), size
    assert bed.handed_back() - before == 10  # each body its own bounded splice
    origin_after = bed.origin_stats()
    # One server connection too (plus our own /stats request's), one request per URL.
    assert origin_after["connections"] - origin_before["connections"] == 2
    for size in sizes:
        assert origin_after["by_path"][f"/bytes/{size}"] == 1


@pytest.mark.root
def test_a_denied_url_is_answered_403_on_the_same_connection(bed: Bed) -> None:
    urls = [
        f"{bed.origin}/bytes/2001",
        f"{bed.origin}/private/x",
        "http://203.0.113.9/bytes/1",
        f"{bed.origin}/bytes/2002",
    ]
    results, bodies = bed.curl(urls)
    assert results == [(1, 200), (0, 403), (0, 403), (0, 200)]
    assert bodies[1].read_bytes().startswith(b"403 Forbidden: denied by the proxy's rule")
    assert _sha(bodies[3]) == _pattern(2002)
    assert "/private/x" not in bed.origin_stats()["by_path"]


@pytest.mark.root
def test_a_miss_costs_the_origin_one_transfer_and_the_next_request_is_a_hit(bed: Bed) -> None:
    url = f"{bed.origin}/bytes/54321"
    first = bed.tb.host("client").cmd(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", "-x", bed.proxy_url, url]
    )
    assert first.returncode == 0 and "X-Cache: HIT" not in first.stdout
    # The tap filled the cache during the splice: the very next request hits.
    results, bodies = bed.curl([url, url], "-D", str(bed.workdir / "hit-heads"))
    assert [code for _, code in results] == [200, 200]
    assert (bed.workdir / "hit-heads").read_text().count("X-Cache: HIT") == 2
    assert all(_sha(path) == _pattern(54321) for path in bodies)
    assert bed.origin_stats()["by_path"]["/bytes/54321"] == 1


@pytest.mark.root
def test_head_has_no_body_and_the_connection_goes_on(bed: Bed) -> None:
    head = bed.tb.host("client").cmd(
        [
            "curl",
            "-sS",
            "-I",
            "-x",
            bed.proxy_url,
            f"{bed.origin}/bytes/77777",
            f"{bed.origin}/bytes/5",
        ]
    )
    assert head.returncode == 0, head.stderr
    assert head.stdout.count("HTTP/1.1 200 OK") == 2
    assert "Content-Length: 77777" in head.stdout and "Via: 1.1 tcp-splice" in head.stdout


@pytest.mark.root
def test_chunked_and_close_delimited_responses_are_copied_and_the_connection_kept(
    bed: Bed,
) -> None:
    urls = [
        f"{bed.side}/chunked/100000",
        f"{bed.side}/len/3000",
        f"{bed.side}/close/50000",  # the proxy re-chunks it: the client's connection stays
        f"{bed.side}/chunked/1",
    ]
    before = bed.handed_back()
    results, bodies = bed.curl(urls)
    assert results == [(1, 200), (0, 200), (0, 200), (0, 200)]
    for size, path in zip([100000, 3000, 50000, 1], bodies, strict=True):
        assert _sha(path) == _pattern(size)
    assert bed.handed_back() - before == 1  # only the body with a Content-Length


@pytest.mark.root
def test_an_http10_client_gets_one_response_per_connection(bed: Bed) -> None:
    urls = [f"{bed.side}/chunked/20000", f"{bed.origin}/bytes/20001"]
    results, bodies = bed.curl(urls, "-0")
    assert results == [(1, 200), (1, 200)]  # the proxy closed after each
    assert _sha(bodies[0]) == _pattern(20000) and _sha(bodies[1]) == _pattern(20001)


@pytest.mark.root
def test_a_kept_alive_origin_connection_closed_under_the_proxy_is_replaced(bed: Bed) -> None:
    # Closed before the reuse: the proxy sees the FIN and connects anew.
    results, bodies = bed.curl([f"{bed.side}/once/1000", f"{bed.side}/once/1001"])
    assert results == [(1, 200), (0, 200)]
    assert _sha(bodies[0]) == _pattern(1000) and _sha(bodies[1]) == _pattern(1001)
    # Closed with the request in flight: retried once (RFC 9112 9.3.1).
    results, bodies = bed.curl([f"{bed.side}/lazy/1002", f"{bed.side}/len/1003"])
    assert results == [(1, 200), (0, 200)]
    assert _sha(bodies[0]) == _pattern(1002) and _sha(bodies[1]) == _pattern(1003)
    assert "len/1003: the origin closed the connection before answering; retrying" in (
        bed.log.read_text()
    )


@pytest.mark.root
def test_a_body_the_origin_cuts_short_resets_the_client(bed: Bed) -> None:
    res = bed.tb.host("client").cmd(
        ["curl", "-sS", "-x", bed.proxy_url, f"{bed.side}/short/200000", "-o", "/dev/null"]
    )
    assert res.returncode in (18, 56), (res.returncode, res.stderr)  # partial file, recv error
    log = bed.log.read_text()
    assert "/short/200000: the origin closed after 100000 of 200000 bytes" in log
    assert f"fill {bed.side}/short/200000" not in log  # nothing stored


@pytest.mark.root
def test_errors_are_answered_and_the_connection_goes_on(bed: Bed) -> None:
    urls = [
        "http://203.0.113.2:81/refused",
        f"{bed.origin}/bytes/3001",
        f"{bed.origin}/nosuch",
        f"{bed.origin}/bytes/3002",
    ]
    results, bodies = bed.curl(urls)
    assert results == [(1, 502), (0, 200), (0, 404), (0, 200)]
    assert b"ECONNREFUSED" in bodies[0].read_bytes()
    assert _sha(bodies[3]) == _pattern(3002)


@pytest.mark.root
def test_uploads_are_copied_with_length_chunked_and_100_continue(bed: Bed) -> None:
    data = bed.workdir / "upload"
    data.write_bytes(bytes(range(256)) * 4000)
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    sink = f"{bed.origin}/sink"
    for extra in ([], ["-H", "Transfer-Encoding: chunked"], ["-H", "Expect: 100-continue"]):
        res = bed.tb.host("client").cmd(
            ["curl", "-sS", "-x", bed.proxy_url, "--data-binary", f"@{data}", *extra, sink, sink]
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [want, want], extra


@pytest.mark.root
def test_connect_is_spliced_for_the_connections_lifetime(bed: Bed) -> None:
    client = bed.tb.host("client")
    for size in (10, 2_000_003):
        rc, digest = curl_sha256(client, f"{bed.origin}/bytes/{size}", "-p", "-x", bed.proxy_url)
        assert rc == 0 and digest == _pattern(size)
    refused = client.cmd(
        ["curl", "-sS", "-p", "-x", bed.proxy_url, "http://203.0.113.9/x", "-w", "%{http_connect}"]
    )
    assert refused.stdout.strip().endswith("403"), refused.stdout


EARLY_TUNNEL = r"""
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
# The tunnel's first bytes in the same send as the CONNECT: the proxy has
# read them, so they must reach the origin ahead of the splice.
connect = b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % sys.argv[3].encode()
get = b"GET /bytes/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % sys.argv[4].encode()
s.sendall(connect + get)
data = b""
while chunk := s.recv(65536):
    data += chunk
established, _, response = data.partition(b"\r\n\r\n")
head, _, body = response.partition(b"\r\n\r\n")
status = head.split(b"\r\n")[0].decode()
print(established.decode(), "|", status, "|", hashlib.sha256(body).hexdigest())
"""


@pytest.mark.root
def test_bytes_sent_behind_a_connect_go_through_the_tunnel_first(bed: Bed) -> None:
    out = run_py(
        bed.tb.host("client"),
        EARLY_TUNNEL,
        "198.51.100.1",
        str(PROXY_PORT),
        "{}:{}".format(*bed.tb.origin),
        "300001",
    )
    established, status, digest = (part.strip() for part in out.split("|"))
    assert established == "HTTP/1.1 200 Connection established"
    assert status == "HTTP/1.1 200 OK" and digest == _pattern(300001)
    assert "bytes of the client's ahead of it" in bed.log.read_text()  # the three-op path


PIPELINE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
origin = sys.argv[3]
requests = [
    (b"GET", b"http://%s/bytes/1111" % origin.encode()),
    (b"HEAD", b"http://%s/bytes/2222" % origin.encode()),
    (b"GET", b"/origin-form"),
    (b"GET", b"http://%s/private/no" % origin.encode()),
    (b"GET", b"http://%s/bytes/3333" % origin.encode()),
]
s.sendall(b"".join(b"%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % r for r in requests))
f = s.makefile("rb")
for method, _ in requests:
    status = f.readline().split()[1].decode()
    length = 0
    while (line := f.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    body = b"" if method == b"HEAD" else f.read(length)
    print(status, length, len(body), __import__("hashlib").sha256(body).hexdigest())
s.close()
"""


@pytest.mark.root
def test_pipelined_requests_are_answered_in_order_on_one_connection(bed: Bed) -> None:
    before = bed.handed_back()
    out = run_py(bed.tb.host("client"), PIPELINE, "198.51.100.1", str(PROXY_PORT), bed.tb.origin[0])
    lines = [line.split() for line in out.splitlines()]
    assert [line[0] for line in lines] == ["200", "200", "400", "403", "200"]
    assert lines[0][3] == _pattern(1111) and lines[4][3] == _pattern(3333)
    assert lines[1][1:3] == ["2222", "0"]  # HEAD: the length, no body
    assert bed.handed_back() - before == 2


STRESS = r"""
import hashlib, http.client, sys, threading
from servers.pattern import DEFAULT_SEED, pattern_chunks
host, port, origin, clients = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sizes = lambda i: [1000, 70000 + i, 0, 300000, 5000 + i % 7]
want = {}
for i in range(clients):
    for n in sizes(i):
        if n not in want:
            h = hashlib.sha256()
            for chunk in pattern_chunks(DEFAULT_SEED, n):
                h.update(chunk)
            want[n] = h.hexdigest()
failures = []
def one(i):
    try:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        for n in sizes(i):
            conn.request("GET", f"http://{origin}/bytes/{n}")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, response.status
            assert hashlib.sha256(body).hexdigest() == want[n], n
        assert conn.sock is not None  # still the first connection
        conn.close()
    except Exception as exc:
        failures.append(f"client {i}: {exc!r}")
threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(len(failures), *failures[:5])
"""


@pytest.mark.root
def test_a_hundred_concurrent_clients_each_reusing_a_connection_all_succeed(bed: Bed) -> None:
    origin_before = bed.origin_stats()
    out = run_py(
        bed.tb.host("client"),
        STRESS,
        "198.51.100.1",
        str(PROXY_PORT),
        "{}:{}".format(*bed.tb.origin),
        "100",
        timeout=120,
    )
    assert out.split()[0] == "0", out
    # A connection per client at most (a client all of whose requests hit needs none).
    connections = bed.origin_stats()["connections"] - origin_before["connections"]
    assert connections <= 101
    assert "Traceback" not in bed.log.read_text()


@pytest.mark.root
def test_the_testbed_runs_the_proxy_as_a_service(tb: Any) -> None:
    client = tb.host("client")
    proxy = "http://{}:{}".format(*tb.http11_proxy)
    origin = "http://{}:{}".format(*tb.origin)
    res = client.cmd(
        [
            "curl",
            "-sS",
            "-x",
            proxy,
            f"{origin}/bytes/10",
            f"{origin}/bytes/11",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects} %{http_code}\n",
        ]
    )
    assert res.stdout.split() == ["1", "200", "0", "200"], res.stderr
    assert "http11-proxy" in tb.status()["services"]
    assert f":{tb.http11_proxy[1]}" in tb.describe()


@pytest.mark.root
def test_bodies_under_splice_min_are_copied_and_the_rest_spliced(bed: Bed) -> None:
    """``--splice-min``: short bodies through the proxy, long ones through the daemon."""
    port = PROXY_PORT + 7
    proxy = bed.tb.host("proxy").popen(
        [
            sys.executable,
            "-m",
            "proxies.http11_proxy",
            "--daemon",
            str(bed.tb.daemon_socket),
            "--source",
            "198.51.100.1",
            "--listen",
            f"198.51.100.1:{port}",
            "--splice-min",
            "1000000",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        sizes = [501, 999_999, 1_000_000, 2_000_003]
        before = bed.handed_back()
        results, bodies = bed.curl(
            [f"{bed.origin}/bytes/{n}" for n in sizes], "-x", f"http://198.51.100.1:{port}"
        )
        assert [code for _, code in results] == [200] * 4
        assert sum(connects for connects, _ in results) == 1
        for size, path in zip(sizes, bodies, strict=True):
            assert _sha(path) == _pattern(size), size
        assert bed.handed_back() - before == 2  # only the two of 1 MB and more
    finally:
        proxy.terminate()
        proxy.wait(10)
