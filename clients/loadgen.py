"""The load generator of the experiments: the client of thesis section 6.1.

    python -m clients.loadgen --server ADDR:PORT --size N [--size M ...]
        [--socks5 HOST:PORT [--user U --password P]] [--repeat R]
        [--concurrency C] [--timeout S] [--upload] [--warmup] [--seed N]

C worker processes are forked (as the thesis's client forks) and start
together. Each repeats R times, for every size in order: connect (directly, or
through the SOCKS5 proxy and its CONNECT), send ``GET /bytes/N`` (or, with
``--upload``, ``POST /sink`` with N pattern bytes), take the response time from
sending the request to the last byte of the response, check the content, close.
The set-up before it (TCP connect, and the SOCKS5 greeting and CONNECT: what
curl calls time_pretransfer) is timed on its own, so the two can be told apart.

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
     "setup_s": 0.00021, "end": 1764000000.124}

``setup_s`` runs from the connection attempt to the moment the request can be
sent (connected; through SOCKS5, the proxy's CONNECT reply read), so
``setup_s + response_time_s`` is the whole request but the close. ``end`` is
the unix time the request was over (connection closed, or failed): with
``start`` it gives the wall-clock span of a run, hence connections per second.

``error`` is null or one of: refused, reset, timeout, unreachable, short
(the stream ended early), corrupt (wrong bytes, extra bytes, wrong digest),
http (not a 200 with the expected framing), socks5:0xNN (the proxy's reply
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


@dataclass(slots=True)
class Result:
    """One request, as reported on stdout."""

    mode: str  # "direct" or "socks5"
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(", ", ": "))


class _Failure(Exception):
    """A request failed in a way the load generator names itself."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


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
    socks5: Socks5Proxy | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    seed: int = DEFAULT_SEED,
    worker: int = 0,
) -> Result:
    """``GET /bytes/size`` from the origin and check every byte against the pattern."""
    host, port = _host_port(server)
    result = _new_result("get", host, port, size, socks5, worker)
    verifier = PatternVerifier(seed, digest=False)

    def consume(chunk: memoryview) -> None:
        verifier.feed(chunk)
        if verifier.first_bad_offset is not None:
            raise _Failure("corrupt", f"byte {verifier.first_bad_offset} differs from the pattern")

    deadline = time.monotonic() + timeout
    try:
        began = time.perf_counter()
        with _connect(host, port, socks5, deadline) as sock:
            request = request_head("GET", f"/bytes/{size}", {"Host": format_host_port(host, port)})
            sent_at = time.perf_counter()
            result.setup_s = sent_at - began
            sock.sendall(request)
            length, leftover = _receive_head(sock, deadline, size)
            _receive_body(sock, deadline, length, leftover, consume)
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
    socks5: Socks5Proxy | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    seed: int = DEFAULT_SEED,
    worker: int = 0,
) -> Result:
    """``POST /sink`` with ``size`` pattern bytes and check the SHA-256 the origin returns."""
    host, port = _host_port(server)
    result = _new_result("upload", host, port, size, socks5, worker)
    expected = pattern_sha256(seed, size)
    reply = bytearray()

    def consume(chunk: memoryview) -> None:
        reply.extend(chunk)
        if len(reply) > 1024:
            raise _Failure("http", "sink reply longer than a hex digest")

    deadline = time.monotonic() + timeout
    try:
        began = time.perf_counter()
        with _connect(host, port, socks5, deadline) as sock:
            headers = {"Host": format_host_port(host, port), "Content-Length": str(size)}
            sent_at = time.perf_counter()
            result.setup_s = sent_at - began
            sock.sendall(request_head("POST", "/sink", headers))
            for chunk in pattern_chunks(seed, size):
                _set_timeout(sock, deadline)
                sock.sendall(chunk)
                result.bytes += len(chunk)
            length, leftover = _receive_head(sock, deadline, None)
            _receive_body(sock, deadline, length, leftover, consume)
            elapsed = time.perf_counter() - sent_at
        digest = bytes(reply).decode("ascii", "replace").strip()
        if digest != expected:
            raise _Failure("corrupt", f"origin hashed the upload as {digest[:64]!r}")
    except Exception as e:
        return _failed(result, e)
    result.ok, result.response_time_s, result.end = True, elapsed, time.time()
    return result


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
    socks5: Socks5Proxy | None = None,
    repeat: int = 1,
    concurrency: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    upload_mode: bool = False,
    seed: int = DEFAULT_SEED,
    warmup: bool = False,
) -> Iterator[Result]:
    """Fork ``concurrency`` workers that each run ``repeat`` rounds over ``sizes``.

    Yields results as they arrive. Workers are released together once all are
    forked (and, with ``warmup``, have made their untimed request), so the load
    is concurrent from the first request. Raises RuntimeError at the end if a
    worker died without reporting all its requests.
    """
    context = multiprocessing.get_context("fork")
    doubled_pattern(seed)  # computed once here, shared copy-on-write after fork
    forked, go = context.Event(), context.Event()
    readers: list[Connection] = []
    workers: list[multiprocessing.process.BaseProcess] = []
    try:
        for index in range(concurrency):
            reader, writer = context.Pipe(duplex=False)
            plan = _WorkerPlan(
                _host_port(server), tuple(sizes), socks5, repeat, timeout, upload_mode, seed, warmup
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
        expected = concurrency * repeat * len(sizes)
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
    socks5: Socks5Proxy | None
    repeat: int
    timeout: float
    upload: bool
    seed: int
    warmup: bool = False


def _worker_main(index: int, plan: _WorkerPlan, out: Connection, forked: Event, go: Event) -> None:
    request = upload if plan.upload else fetch
    forked.wait()
    if plan.warmup:
        # Its outcome does not matter: a broken path fails the timed requests too.
        request(plan.server, 1, plan.socks5, plan.timeout, seed=plan.seed, worker=index)
        out.send(_READY)
    go.wait()
    for _ in range(plan.repeat):
        for size in plan.sizes:
            result = request(
                plan.server, size, plan.socks5, plan.timeout, seed=plan.seed, worker=index
            )
            out.send(result.to_json())
    out.close()


def _host_port(server: tuple[str, int] | str) -> tuple[str, int]:
    return parse_host_port(server) if isinstance(server, str) else server


def _new_result(
    op: str, host: str, port: int, size: int, socks5: Socks5Proxy | None, worker: int
) -> Result:
    return Result(
        mode="socks5" if socks5 else "direct",
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


def _set_timeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("request deadline passed")
    sock.settimeout(remaining)


def _connect(host: str, port: int, socks5: Socks5Proxy | None, deadline: float) -> socket.socket:
    remaining = max(deadline - time.monotonic(), 0.001)
    if socks5 is None:
        return socket.create_connection((host, port), timeout=remaining)
    sock = socket.create_connection((socks5.host, socks5.port), timeout=remaining)
    try:
        _set_timeout(sock, deadline)
        socks5_connect(sock, host, port, username=socks5.username, password=socks5.password)
    except BaseException:
        sock.close()
        raise
    return sock


def _receive_head(
    sock: socket.socket, deadline: float, expect_length: int | None
) -> tuple[int | None, bytes]:
    """Read and check the response head; returns its Content-Length and the body bytes read with it.

    ``expect_length`` None accepts any Content-Length, or none (body to EOF).
    """
    buffer = bytearray()
    end = head_end(buffer)
    while end < 0:
        if len(buffer) > _MAX_HEAD:
            raise _Failure("http", f"response head longer than {_MAX_HEAD} bytes")
        _set_timeout(sock, deadline)
        data = sock.recv(_RECV_SIZE)
        if not data:
            raise _Failure("short", f"connection closed after {len(buffer)} bytes of response head")
        buffer += data
        end = head_end(buffer)
    head = parse_response_head(buffer[:end])
    if head.status != 200:
        raise _Failure("http", f"status {head.status} {head.reason}".rstrip())
    length = content_length(head.headers)
    if expect_length is not None and length != expect_length:
        raise _Failure("http", f"Content-Length {length}, expected {expect_length}")
    return length, bytes(buffer[end:])


def _receive_body(
    sock: socket.socket,
    deadline: float,
    length: int | None,
    leftover: bytes,
    consume: Callable[[memoryview], None],
) -> None:
    """Hand ``length`` body bytes (None: up to EOF) to ``consume``, starting with ``leftover``."""
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


def summarize(results: Sequence[Result]) -> str:
    """One line: request count, failures, and response-time median and extremes of the rest."""
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
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clients.loadgen",
        description="Time HTTP/1.0 downloads of /bytes/N, directly or via SOCKS5.",
    )
    parser.add_argument("--server", required=True, metavar="ADDR:PORT", help="the origin server")
    parser.add_argument(
        "--size", required=True, action="append", metavar="N", help="bytes; K/M/G = 1024^k"
    )
    parser.add_argument("--socks5", metavar="HOST:PORT", help="go through this SOCKS5 proxy")
    parser.add_argument("--user", help="SOCKS5 username (RFC 1929)")
    parser.add_argument("--password", help="SOCKS5 password (RFC 1929)")
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
        proxy = None
        if args.socks5:
            proxy = Socks5Proxy(*parse_host_port(args.socks5), args.user, args.password)
        elif args.user or args.password:
            raise ValueError("--user/--password need --socks5")
        if args.repeat < 1 or args.concurrency < 1 or args.timeout <= 0:
            raise ValueError("--repeat, --concurrency and --timeout must be positive")
    except ValueError as e:
        parser.error(str(e))

    results: list[Result] = []
    for result in run_load(
        server,
        sizes,
        socks5=proxy,
        repeat=args.repeat,
        concurrency=args.concurrency,
        timeout=args.timeout,
        upload_mode=args.upload,
        seed=args.seed,
        warmup=args.warmup,
    ):
        print(result.to_json(), flush=True)
        results.append(result)
    if len(sizes) > 1:
        for size in sizes:
            same = [r for r in results if r.size == size]
            print(f"loadgen: size {size}: {summarize(same)}", file=sys.stderr)
    print(f"loadgen: {summarize(results)}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
