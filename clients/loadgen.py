"""The load generator of the experiments: the client of thesis section 6.1.

    python -m clients.loadgen --server ADDR:PORT --size N [--size M ...]
        [--socks5 HOST:PORT [--user U --password P] | --http-proxy HOST:PORT]
        [--keepalive K] [--repeat R] [--concurrency C] [--timeout S] [--upload]
        [--warmup] [--seed N]

C worker processes are forked (as the thesis's client forks) and start
together. Each repeats R times, for every size in order: connect (directly, or
through the SOCKS5 proxy and its CONNECT), send ``GET /bytes/N`` (or, with
``--upload``, ``POST /sink`` with N pattern bytes), take the response time from
sending the request to the last byte of the response, check the content, close.
The set-up before it (TCP connect, and the SOCKS5 greeting and CONNECT: what
curl calls time_pretransfer) is timed on its own, so the two can be told apart.
These requests are HTTP/1.0: one per connection, closed by the server.

``--http-proxy``: the connection goes to an HTTP forward proxy and the request
names the origin in absolute-form (RFC 9112 section 3.2.2), ``GET
http://ADDR:PORT/bytes/N``, with ``Cache-Control: no-cache`` so that a caching
proxy relays every response from the origin instead of timing its cache; set-up
is the TCP connect to the proxy alone (the proxy connects to the origin once it
has read the request, inside the response time).

``--keepalive K``: HTTP/1.1 persistent connections (RFC 9112 section 9.3).
For every size, each worker makes K GETs one after another on one connection,
each timed and checked on its own, and closes it after the K-th. Responses
are framed by Content-Length (never by waiting for the close). ``setup_s`` is
timed on the request that opened the connection and is 0 on the ones that
reused it; ``index_on_conn`` numbers the requests on a connection from 0. A
server or proxy may end the connection after any response (``Connection:
close``, or silently, as tinyproxy does): the next request then opens a new
one (index 0 again, set-up timed), as curl and browsers do, and a GET sent on
a reused connection that closes before any byte of its response is sent once
more on a new one (RFC 9112 section 9.3.1; ``detail`` says so). The number of
requests with index 0 is the number of connections opened.

With ``--warmup`` each worker first makes one untimed, unreported request of
one byte (same path, same op), and the workers are released only once every
one has: otherwise the first timed request of each process, always the first
size, pays the process's first-call costs (glibc's resolver loads its
configuration on the first getaddrinfo, ~2.5 ms here; cold code paths, ~1 ms).

Content is checked, not only counted: a download against the seeded pattern
(servers.pattern), an upload by the SHA-256 the origin returns. A failed
request is reported with an error code and never contributes a time.

Output: one JSON object per request on stdout, as results arrive::

    {"mode": "direct", "op": "get", "size": 1024, "ok": true,
     "response_time_s": 0.00042, "bytes": 1024, "error": null, "detail": null,
     "worker": 0, "pid": 4242, "start": 1764000000.123, "server": "203.0.113.2:80",
     "setup_s": 0.00021, "end": 1764000000.124, "index_on_conn": 0}

``setup_s`` runs from the connection attempt to the moment the request can be
sent (connected; through SOCKS5, the proxy's CONNECT reply read), so
``setup_s + response_time_s`` is the whole request but the close. ``end`` is
the unix time the request was over (connection closed, or failed; with
``--keepalive``, its last byte read): with ``start`` it gives the wall-clock
span of a run, hence connections per second. ``mode`` is direct, socks5 or
http-proxy.

``error`` is null or one of: refused, reset, timeout, unreachable, short
(the stream ended early), corrupt (wrong bytes, extra bytes, wrong digest),
http (not a 200 with the expected framing; an HTTP proxy's own 502 or 504
too), socks5:0xNN (the proxy's reply
code), socks5:auth, socks5:protocol, and os:ERRNO for any other socket error.
A summary goes to stderr. Exit status 0 when every request succeeded, 1
otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

from clients.socks5 import Socks5AuthError, Socks5Error, Socks5ProtocolError, socks5_connect
from servers.address import format_host_port, parse_host_port
from servers.http1 import (
    HttpParseError,
    ResponseHead,
    content_length,
    head_end,
    parse_response_head,
    request_head,
)
from servers.pattern import DEFAULT_SEED, PatternVerifier, doubled_pattern, pattern_chunks

DEFAULT_TIMEOUT = 30.0

_RECV_SIZE = 1 << 20
_MAX_HEAD = 16 * 1024
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


@dataclass(slots=True, frozen=True)
class Socks5Proxy:
    host: str
    port: int
    username: str | None = None
    password: str | None = None


@dataclass(slots=True, frozen=True)
class HttpProxy:
    """An HTTP forward proxy: requests go to it with the origin in absolute-form."""

    host: str
    port: int


Proxy = Socks5Proxy | HttpProxy


@dataclass(slots=True)
class Result:
    """One request, as reported on stdout."""

    mode: str  # "direct", "socks5" or "http-proxy"
    op: str  # "get" or "upload"
    size: int
    ok: bool
    response_time_s: float | None  # request sent -> last response byte; None unless ok
    bytes: int  # body bytes received (get) or sent (upload)
    error: str | None
    detail: str | None  # a human-readable cause next to the error code
    worker: int
    pid: int  # the worker process, so concurrent runs can be told apart
    start: float  # unix time the connection attempt began
    server: str
    # connection attempt -> ready to send the request (TCP connect, SOCKS5 CONNECT
    # reply); None unless the set-up completed (it may, and the transfer still fail)
    setup_s: float | None = None
    end: float | None = None  # unix time the request was over: closed, or failed
    # The request's place on its connection: 0 opened it (setup_s timed), n > 0
    # is its n-th reuse (--keepalive; setup_s 0).  Always 0 without keep-alive.
    index_on_conn: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(", ", ": "))


class _Failure(Exception):
    """A request failed in a way the load generator names itself."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


class _NoResponse(_Failure):
    """The connection ended (FIN or RST) before any byte of the response arrived.

    On a reused keep-alive connection this is the race RFC 9112 section 9.3.1
    allows a client to retry: the server closed while the request was on its way.
    """


def parse_size(text: str) -> int:
    """``"1024"``, ``"1K"``, ``"16M"``, ``"1G"``: suffixes are powers of 1024."""
    body = text.strip().upper()
    suffix = body[-1:] if body[-1:] in _SIZE_SUFFIXES else ""
    digits = body[: len(body) - len(suffix)]
    if not digits.isdigit():
        raise ValueError(f"bad size {text!r}: use an integer with an optional K, M, G or T")
    return int(digits) * _SIZE_SUFFIXES[suffix]


def classify(error: BaseException) -> str:
    """The report's error code for an exception raised during a request."""
    if isinstance(error, _Failure):
        return error.error
    if isinstance(error, Socks5Error):
        return f"socks5:0x{error.reply_code:02x}"
    if isinstance(error, Socks5AuthError):
        return "socks5:auth"
    if isinstance(error, Socks5ProtocolError):
        return "socks5:protocol"
    if isinstance(error, HttpParseError):
        return "http"
    # TimeoutError covers socket timeouts and a kernel ETIMEDOUT on connect.
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(error, socket.gaierror):
        return "unreachable"
    if isinstance(error, OSError) and error.errno in _UNREACHABLE:
        return "unreachable"
    if isinstance(error, OSError) and error.errno is not None:
        return f"os:{errno.errorcode.get(error.errno, error.errno)}"
    raise error


def fetch(
    server: tuple[str, int] | str,
    size: int,
    proxy: Proxy | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    seed: int = DEFAULT_SEED,
    worker: int = 0,
) -> Result:
    """``GET /bytes/size`` from the origin and check every byte against the pattern."""
    host, port = _host_port(server)
    result = _new_result("get", host, port, size, proxy, worker)
    verifier = PatternVerifier(seed, digest=False)

    deadline = time.monotonic() + timeout
    try:
        began = time.perf_counter()
        with _connect(host, port, proxy, deadline) as sock:
            target = _target(host, port, f"/bytes/{size}", proxy)
            request = request_head("GET", target, _get_headers(host, port, proxy))
            sent_at = time.perf_counter()
            result.setup_s = sent_at - began
            sock.sendall(request)
            _, length, leftover = _receive_head(sock, deadline, size)
            _receive_body(sock, deadline, length, leftover, _pattern_check(verifier))
            elapsed = time.perf_counter() - sent_at
            result.bytes = verifier.offset
            _expect_close(sock, deadline)
    except Exception as e:
        result.bytes = verifier.offset
        return _failed(result, e)
    result.ok, result.response_time_s, result.end = True, elapsed, time.time()
    return result


def upload(
    server: tuple[str, int] | str,
    size: int,
    proxy: Proxy | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    seed: int = DEFAULT_SEED,
    worker: int = 0,
) -> Result:
    """``POST /sink`` with ``size`` pattern bytes and check the SHA-256 the origin returns."""
    host, port = _host_port(server)
    result = _new_result("upload", host, port, size, proxy, worker)
    expected = pattern_sha256(seed, size)
    reply = bytearray()

    def consume(chunk: memoryview) -> None:
        reply.extend(chunk)
        if len(reply) > 1024:
            raise _Failure("http", "sink reply longer than a hex digest")

    deadline = time.monotonic() + timeout
    try:
        began = time.perf_counter()
        with _connect(host, port, proxy, deadline) as sock:
            headers = {"Host": format_host_port(host, port), "Content-Length": str(size)}
            target = _target(host, port, "/sink", proxy)
            sent_at = time.perf_counter()
            result.setup_s = sent_at - began
            sock.sendall(request_head("POST", target, headers))
            for chunk in pattern_chunks(seed, size):
                _set_timeout(sock, deadline)
                sock.sendall(chunk)
                result.bytes += len(chunk)
            _, length, leftover = _receive_head(sock, deadline, None)
            _receive_body(sock, deadline, length, leftover, consume)
            elapsed = time.perf_counter() - sent_at
        digest = bytes(reply).decode("ascii", "replace").strip()
        if digest != expected:
            raise _Failure("corrupt", f"origin hashed the upload as {digest[:64]!r}")
    except Exception as e:
        return _failed(result, e)
    result.ok, result.response_time_s, result.end = True, elapsed, time.time()
    return result


def fetch_keepalive(
    server: tuple[str, int] | str,
    size: int,
    proxy: Proxy | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    requests: int,
    seed: int = DEFAULT_SEED,
    worker: int = 0,
) -> Iterator[Result]:
    """``requests`` GETs of /bytes/size, one after another on one HTTP/1.1 connection.

    Yields each request's result as it completes; ``timeout`` bounds each
    request. The connection is reopened whenever the server ends it (see the
    module's docstring) and closed by us after the last request.
    """
    host, port = _host_port(server)
    conn = PersistentConnection(host, port, proxy)
    try:
        for n in range(requests):
            yield conn.get(size, timeout, seed=seed, worker=worker, last=n == requests - 1)
    finally:
        conn.close()


@dataclass(slots=True)
class PersistentConnection:
    """One client's HTTP/1.1 connection to an origin, directly or through a proxy.

    Opened by the first request and whenever the previous one ended it; a
    request that fails closes it (its state is unknown), so the next opens
    a new one.
    """

    host: str
    port: int
    proxy: Proxy | None = None
    sock: socket.socket | None = None
    answered: int = 0  # responses read on `sock`: the next request's index_on_conn

    def get(
        self, size: int, timeout: float, *, seed: int = DEFAULT_SEED, worker: int = 0, last: bool
    ) -> Result:
        """``GET /bytes/size``, every byte checked; with ``last``, the connection closes after."""
        result = _new_result("get", self.host, self.port, size, self.proxy, worker)
        verifier = PatternVerifier(seed, digest=False)
        deadline = time.monotonic() + timeout
        try:
            try:
                elapsed = self._exchange(result, verifier, size, deadline)
            except _NoResponse:
                if result.index_on_conn == 0:
                    raise  # a new connection that ends at once is a failure, not a race
                # RFC 9112 9.3.1: a reused connection closed before answering;
                # GET is idempotent, so it goes once more, on a new connection.
                self.close()
                verifier = PatternVerifier(seed, digest=False)
                elapsed = self._exchange(result, verifier, size, deadline)
                result.detail = "sent again on a new connection: the reused one closed unanswered"
            if last and self.sock is not None:
                # We close next: nothing may have followed the last response.
                _peer_closed(self.sock)
        except Exception as e:
            self.close()
            result.bytes = verifier.offset
            return _failed(result, e)
        finally:
            if last:
                self.close()
        result.ok, result.response_time_s, result.end = True, elapsed, time.time()
        return result

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.answered = None, 0

    def _exchange(
        self, result: Result, verifier: PatternVerifier, size: int, deadline: float
    ) -> float:
        """One request and its response on the connection (opened if need be); its time."""
        if self.sock is not None and _peer_closed(self.sock):
            self.close()  # the server ended it after the last response, as it may
        if self.sock is None:
            began = time.perf_counter()
            self.sock = _connect(self.host, self.port, self.proxy, deadline)
            result.setup_s = time.perf_counter() - began
        else:
            result.setup_s = 0.0
        result.index_on_conn = self.answered
        sock = self.sock
        target = _target(self.host, self.port, f"/bytes/{size}", self.proxy)
        request = _http11_head("GET", target, _get_headers(self.host, self.port, self.proxy))
        sent_at = time.perf_counter()
        try:
            _set_timeout(sock, deadline)
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as e:
            why = f"connection closed before the request went out: {e}"
            raise _NoResponse("reset", why) from e
        # Content-Length must be the size asked for: the framing is checked.
        head, length, leftover = _receive_head(sock, deadline, size)
        _receive_body(sock, deadline, length, leftover, _pattern_check(verifier))
        elapsed = time.perf_counter() - sent_at
        result.bytes = verifier.offset
        self.answered += 1
        if not persistent(head):
            # The server said this response is the connection's last: the
            # client closes it after reading the response (RFC 9112 9.6),
            # without waiting for the server's FIN.  Nothing may follow it.
            _peer_closed(sock)
            self.close()
        return elapsed


def persistent(head: ResponseHead) -> bool:
    """Whether the connection stays open after this response (RFC 9112 section 9.3)."""
    tokens = {t.strip().lower() for t in head.headers.get("connection", "").split(",")}
    if "close" in tokens:
        return False
    if head.version == "HTTP/1.0":
        return "keep-alive" in tokens
    return head.version.startswith("HTTP/1.")


@functools.cache
def pattern_sha256(seed: int, size: int) -> str:
    """SHA-256 of the first ``size`` pattern bytes (cached: uploads repeat sizes)."""
    sha = hashlib.sha256()
    for chunk in pattern_chunks(seed, size):
        sha.update(chunk)
    return sha.hexdigest()


def run_load(
    server: tuple[str, int] | str,
    sizes: Sequence[int],
    *,
    proxy: Proxy | None = None,
    repeat: int = 1,
    concurrency: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    upload_mode: bool = False,
    seed: int = DEFAULT_SEED,
    warmup: bool = False,
    keepalive: int | None = None,
) -> Iterator[Result]:
    """Fork ``concurrency`` workers that each run ``repeat`` rounds over ``sizes``.

    With ``keepalive`` K, each size of a round is K requests on one connection.
    Yields results as they arrive. Workers are released together once all are
    forked (and, with ``warmup``, have made their untimed request), so the load
    is concurrent from the first request. Raises RuntimeError at the end if a
    worker died without reporting all its requests.
    """
    if keepalive is not None and upload_mode:
        raise ValueError("keep-alive requests are downloads: uploads go one per connection")
    context = multiprocessing.get_context("fork")
    doubled_pattern(seed)  # computed once here, shared copy-on-write after fork
    forked, go = context.Event(), context.Event()
    readers: list[Connection] = []
    workers: list[multiprocessing.process.BaseProcess] = []
    try:
        for index in range(concurrency):
            reader, writer = context.Pipe(duplex=False)
            plan = _WorkerPlan(
                _host_port(server),
                tuple(sizes),
                proxy,
                repeat,
                timeout,
                upload_mode,
                seed,
                warmup,
                keepalive,
            )
            child = context.Process(
                target=_worker_main,
                args=(index, plan, writer, forked, go),
                name=f"loadgen-{index}",
            )
            child.start()
            writer.close()  # the worker holds the only write end: its exit is our EOF
            readers.append(reader)
            workers.append(child)
        # Warm-ups start once every worker is forked: a connection open in this
        # process while it forks would live on in the child (and in a test whose
        # server runs here, keep the server's close from reaching the client).
        forked.set()
        if warmup:
            for reader in readers:
                # A worker that dies here leaves EOF, and its requests missing at the end.
                with contextlib.suppress(EOFError):
                    reader.recv()
        go.set()
        expected = concurrency * repeat * len(sizes) * (keepalive or 1)
        received = 0
        pending = list(readers)
        while pending:
            for ready in multiprocessing.connection.wait(pending):
                assert isinstance(ready, Connection)
                try:
                    line = ready.recv()
                except EOFError:
                    pending.remove(ready)
                    continue
                received += 1
                yield Result(**json.loads(line))
        for process in workers:
            process.join()
        if received != expected:
            codes = [p.exitcode for p in workers]
            raise RuntimeError(f"got {received} of {expected} results; worker exit codes {codes}")
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()
            process.join()
        for reader in readers:
            reader.close()


_READY = "ready"  # a worker's untimed warm-up request is done


@dataclass(slots=True, frozen=True)
class _WorkerPlan:
    server: tuple[str, int]
    sizes: tuple[int, ...]
    proxy: Proxy | None
    repeat: int
    timeout: float
    upload: bool
    seed: int
    warmup: bool = False
    keepalive: int | None = None  # requests per connection; None: HTTP/1.0, one each

    def requests(self, size: int, index: int, count: int | None = None) -> Iterator[Result]:
        """The requests of one size: one, or ``count`` (default: keepalive) on one connection."""
        per_conn = count or self.keepalive
        if per_conn is not None:
            yield from fetch_keepalive(
                self.server,
                size,
                self.proxy,
                self.timeout,
                requests=per_conn,
                seed=self.seed,
                worker=index,
            )
            return
        request = upload if self.upload else fetch
        yield request(self.server, size, self.proxy, self.timeout, seed=self.seed, worker=index)


def _worker_main(index: int, plan: _WorkerPlan, out: Connection, forked: Event, go: Event) -> None:
    forked.wait()
    if plan.warmup:
        # Its outcome does not matter: a broken path fails the timed requests too.
        for _ in plan.requests(1, index, count=1 if plan.keepalive else None):
            pass
        out.send(_READY)
    go.wait()
    for _ in range(plan.repeat):
        for size in plan.sizes:
            for result in plan.requests(size, index):
                out.send(result.to_json())
    out.close()


def _host_port(server: tuple[str, int] | str) -> tuple[str, int]:
    return parse_host_port(server) if isinstance(server, str) else server


def _mode(proxy: Proxy | None) -> str:
    if isinstance(proxy, Socks5Proxy):
        return "socks5"
    return "http-proxy" if isinstance(proxy, HttpProxy) else "direct"


def _new_result(
    op: str, host: str, port: int, size: int, proxy: Proxy | None, worker: int
) -> Result:
    return Result(
        mode=_mode(proxy),
        op=op,
        size=size,
        ok=False,
        response_time_s=None,
        bytes=0,
        error=None,
        detail=None,
        worker=worker,
        pid=os.getpid(),
        start=time.time(),
        server=format_host_port(host, port),
    )


def _failed(result: Result, error: Exception) -> Result:
    result.error = classify(error)
    result.detail = str(error) or type(error).__name__
    result.end = time.time()
    return result


def _pattern_check(verifier: PatternVerifier) -> Callable[[memoryview], None]:
    """A body consumer that feeds `verifier` and fails at the first wrong byte."""

    def consume(chunk: memoryview) -> None:
        verifier.feed(chunk)
        if verifier.first_bad_offset is not None:
            raise _Failure("corrupt", f"byte {verifier.first_bad_offset} differs from the pattern")

    return consume


def _target(host: str, port: int, path: str, proxy: Proxy | None) -> str:
    """The request target: origin-form, or absolute-form for an HTTP proxy (RFC 9112 3.2)."""
    if isinstance(proxy, HttpProxy):
        return f"http://{format_host_port(host, port)}{path}"
    return path


def _get_headers(host: str, port: int, proxy: Proxy | None) -> dict[str, str]:
    headers = {"Host": format_host_port(host, port)}
    if isinstance(proxy, HttpProxy):
        # A caching proxy (ours are) would answer repeated GETs from its cache
        # and the run would time cache hits: every request must reach the
        # origin through the proxy's relay (RFC 9111 5.2.1.4).
        headers["Cache-Control"] = "no-cache"
    return headers


def _http11_head(method: str, target: str, headers: dict[str, str]) -> bytes:
    # servers.http1.request_head writes HTTP/1.0, which a server closes after
    # one response; a persistent connection needs 1.1 (RFC 9112 section 9.3).
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _set_timeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("request deadline passed")
    sock.settimeout(remaining)


def _connect(host: str, port: int, proxy: Proxy | None, deadline: float) -> socket.socket:
    remaining = max(deadline - time.monotonic(), 0.001)
    if proxy is None:
        return socket.create_connection((host, port), timeout=remaining)
    sock = socket.create_connection((proxy.host, proxy.port), timeout=remaining)
    if isinstance(proxy, HttpProxy):
        return sock  # the request itself names the origin
    try:
        _set_timeout(sock, deadline)
        socks5_connect(sock, host, port, username=proxy.username, password=proxy.password)
    except BaseException:
        sock.close()
        raise
    return sock


def _receive_head(
    sock: socket.socket, deadline: float, expect_length: int | None
) -> tuple[ResponseHead, int | None, bytes]:
    """Read and check the response head; returns it, its Content-Length and body bytes read with it.

    ``expect_length`` None accepts any Content-Length, or none (body to EOF).
    A connection that ends before the head's first byte raises `_NoResponse`.
    """
    buffer = bytearray()
    end = head_end(buffer)
    while end < 0:
        if len(buffer) > _MAX_HEAD:
            raise _Failure("http", f"response head longer than {_MAX_HEAD} bytes")
        _set_timeout(sock, deadline)
        try:
            data = sock.recv(_RECV_SIZE)
        except ConnectionResetError as e:
            if buffer:
                raise
            raise _NoResponse("reset", str(e)) from e
        if not data:
            why = f"connection closed after {len(buffer)} bytes of response head"
            raise _Failure("short", why) if buffer else _NoResponse("short", why)
        buffer += data
        end = head_end(buffer)
    head = parse_response_head(buffer[:end])
    if head.status != 200:
        raise _Failure("http", f"status {head.status} {head.reason}".rstrip())
    if "transfer-encoding" in head.headers:
        # The origin always sends Content-Length; a coding means something on
        # the path re-framed the body, which the load client does not decode.
        raise _Failure("http", f"Transfer-Encoding {head.headers['transfer-encoding']}")
    length = content_length(head.headers)
    if expect_length is not None and length != expect_length:
        raise _Failure("http", f"Content-Length {length}, expected {expect_length}")
    return head, length, bytes(buffer[end:])


def _receive_body(
    sock: socket.socket,
    deadline: float,
    length: int | None,
    leftover: bytes,
    consume: Callable[[memoryview], None],
) -> None:
    """Hand ``length`` body bytes (None: up to EOF) to ``consume``, starting with ``leftover``.

    With a length it never reads past the body: on a persistent connection what
    follows belongs to the next response (and since requests are not pipelined,
    bytes already there with this one are extra).
    """
    if length is not None and len(leftover) > length:
        raise _Failure("corrupt", f"{len(leftover) - length} bytes beyond Content-Length")
    if leftover:
        consume(memoryview(leftover))
    received = len(leftover)
    buffer = bytearray(_RECV_SIZE)
    view = memoryview(buffer)
    while length is None or received < length:
        _set_timeout(sock, deadline)
        want = _RECV_SIZE if length is None else min(_RECV_SIZE, length - received)
        n = sock.recv_into(view, want)
        if n == 0:
            if length is None:
                return
            raise _Failure("short", f"connection closed after {received} of {length} body bytes")
        consume(view[:n])
        received += n


def _expect_close(sock: socket.socket, deadline: float) -> None:
    """After a complete body, the HTTP/1.0 server's FIN must come next, not more data.

    Extra bytes mean a relay duplicated or misplaced data. A reset or a missing
    FIN after a complete body does not change what the client received, so
    only extra data fails the request.
    """
    try:
        _set_timeout(sock, deadline)
        extra = sock.recv(_RECV_SIZE)
    except OSError:
        return
    if extra:
        raise _Failure("corrupt", f"{len(extra)}+ bytes after the end of the body")


def _peer_closed(sock: socket.socket) -> bool:
    """Whether a kept connection was ended by the server (FIN or RST), without waiting.

    Checked before each reuse, as curl does. No request is outstanding, so
    any byte waiting is one nobody asked for: the last response was longer
    than its Content-Length said.
    """
    # A socket with a timeout polls for readability before every recv, flags
    # or not: only a non-blocking one answers at once.  The next use of the
    # socket sets its timeout again (_set_timeout).
    sock.setblocking(False)
    try:
        waiting = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    if waiting:
        raise _Failure("corrupt", "bytes after the end of the previous response")
    return True


def summarize(results: Sequence[Result], keepalive: bool = False) -> str:
    """One line: request count, failures, and response-time median and extremes of the rest.

    With ``keepalive``, also how many connections the requests took.
    """
    times = sorted(r.response_time_s for r in results if r.ok and r.response_time_s is not None)
    failed = len(results) - len(times)
    line = f"{len(results)} requests, {failed} failed"
    if failed:
        errors: dict[str, int] = {}
        for r in results:
            if not r.ok:
                errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
        line += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) + ")"
    if times:
        median = statistics.median(times)
        line += f", median {median:.6f} s, min {times[0]:.6f} s, max {times[-1]:.6f} s"
        total = sum(r.bytes for r in results if r.ok)
        # Mean per-request throughput, the figure a reader compares with link rates.
        line += f", {total / sum(times) / 1e6:.1f} MB/s per request"
    if keepalive:
        line += f", {sum(1 for r in results if r.index_on_conn == 0)} connections"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clients.loadgen",
        description="Time HTTP downloads of /bytes/N, directly, via SOCKS5 or an HTTP proxy;"
        " one per connection (HTTP/1.0) or K per connection (--keepalive, HTTP/1.1).",
    )
    parser.add_argument("--server", required=True, metavar="ADDR:PORT", help="the origin server")
    parser.add_argument(
        "--size", required=True, action="append", metavar="N", help="bytes; K/M/G = 1024^k"
    )
    parser.add_argument("--socks5", metavar="HOST:PORT", help="go through this SOCKS5 proxy")
    parser.add_argument("--user", help="SOCKS5 username (RFC 1929)")
    parser.add_argument("--password", help="SOCKS5 password (RFC 1929)")
    parser.add_argument(
        "--http-proxy",
        metavar="HOST:PORT",
        help="go through this HTTP forward proxy (requests in absolute-form)",
    )
    parser.add_argument(
        "--keepalive",
        type=int,
        metavar="K",
        help="K GETs per HTTP/1.1 connection for every size (default: HTTP/1.0, one)",
    )
    parser.add_argument("--repeat", type=int, default=1, metavar="R", help="rounds per worker")
    parser.add_argument("--concurrency", type=int, default=1, metavar="C", help="worker processes")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S")
    parser.add_argument("--upload", action="store_true", help="POST N bytes to /sink instead")
    parser.add_argument(
        "--warmup",
        action="store_true",
        help="one untimed 1-byte request per worker first (first-call costs out of the times)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="pattern seed (default 1)")
    args = parser.parse_args(argv)
    try:
        server = parse_host_port(args.server)
        sizes = [parse_size(text) for text in args.size]
        proxy: Proxy | None = None
        if args.socks5 and args.http_proxy:
            raise ValueError("--socks5 and --http-proxy: choose one")
        if args.socks5:
            proxy = Socks5Proxy(*parse_host_port(args.socks5), args.user, args.password)
        elif args.user or args.password:
            raise ValueError("--user/--password need --socks5")
        elif args.http_proxy:
            proxy = HttpProxy(*parse_host_port(args.http_proxy))
        if args.repeat < 1 or args.concurrency < 1 or args.timeout <= 0:
            raise ValueError("--repeat, --concurrency and --timeout must be positive")
        if args.keepalive is not None and args.keepalive < 1:
            raise ValueError("--keepalive must be at least 1")
        if args.keepalive is not None and args.upload:
            raise ValueError("--keepalive makes downloads: uploads go one per connection")
    except ValueError as e:
        parser.error(str(e))

    results: list[Result] = []
    keepalive = args.keepalive is not None
    for result in run_load(
        server,
        sizes,
        proxy=proxy,
        repeat=args.repeat,
        concurrency=args.concurrency,
        timeout=args.timeout,
        upload_mode=args.upload,
        seed=args.seed,
        warmup=args.warmup,
        keepalive=args.keepalive,
    ):
        print(result.to_json(), flush=True)
        results.append(result)
    if len(sizes) > 1:
        for size in sizes:
            same = [r for r in results if r.size == size]
            print(f"loadgen: size {size}: {summarize(same, keepalive)}", file=sys.stderr)
    print(f"loadgen: {summarize(results, keepalive)}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
