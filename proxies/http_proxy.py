"""HTTP/1.0 forward proxy that splices misses and serves hits (thesis Fig. 4.3).

Read first: RFC 1945 (HTTP/1.0) section 5.1.2 (absolute URIs to proxies);
RFC 7230 sections 5.3.2 (absolute-form), 5.4 (Host), 5.7 and 6.1 (what a
proxy forwards and which headers are hop-by-hop); ``proxies/http_cache.py``.

Per client, the steps of the thesis' pseudocode, over the daemon's API:

* read the request head (``GET http://host:port/path HTTP/1.x``) with
  ``MSG_PEEK`` so nothing after the head is consumed: a request body stays in
  the daemon and is relayed by the splice;
* **hit**: answer from the cache on the client connection (the proxy is the
  endpoint here), ``X-Cache: HIT``, then FIN;
* **miss**: ``intend_splice``, connect the reserved server side, write the
  request in origin-form (RFC 7230 5.3.1) to the server fd, ``splice(client,
  server, 0)`` (nothing more for the proxy to say), close both descriptors.
  The response flows origin -> client inside the daemon;
* then, because the spliced response never reaches the proxy (thesis 4.4:
  that needs a TCP tap), a cacheable GET is fetched once more on a connection
  of the proxy's own and stored, so the next request is a hit.

Errors the proxy answers itself: 400 (malformed head, origin-form target),
501 (CONNECT, other schemes), 505 (version), 431 (head too long), 502 (name
does not resolve, connect refused or unreachable), 504 (connect timed out).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from daemon.api.aio import AsyncConnection, AsyncSpliceClient, DaemonGone, SpliceError
from proxies.aio_shell import (
    close_gently,
    connect_server,
    destinations_async,
    refuse_intended,
    run_proxy,
)
from proxies.daemon_shell import check_source, local_for
from proxies.http_cache import (
    CachedObject,
    ObjectCache,
    request_is_cacheable,
    response_is_storable,
)
from proxies.socks5 import add_listen_option
from servers.http1 import MAX_HEAD, HttpParseError, head_end, parse_response_head

log = logging.getLogger("proxies.http_proxy")

PROG = "http_proxy"
HEAD_TIMEOUT = 30.0  # a client that never finishes its head is dropped
FILL_TIMEOUT = 30.0  # per read while the proxy fetches an object for the cache
DEFAULT_MAX_OBJECT = 1 << 20
DEFAULT_MAX_BYTES = 64 << 20

# RFC 7230 6.1 (and RFC 2616 13.5.1): meaningful for one connection only, so
# never forwarded; plus the de-facto Proxy-Connection. Transfer-Encoding is
# hop-by-hop too, but the splice relays a request body untouched, so its
# framing header must go along with it.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


# -- sans-I/O: the request, the rewrite, the responses the proxy writes itself ------


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A request in absolute-form, split into what the origin and the cache need."""

    method: str
    host: str  # IP literal (no brackets) or a name
    port: int
    path: str  # origin-form: path and query
    version: str
    fields: tuple[tuple[str, str], ...]  # header fields as sent, in order
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names, last value wins

    @property
    def authority(self) -> str:
        """host[:port] for the Host header (RFC 7230 5.4), brackets around IPv6."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"

    @property
    def cache_key(self) -> str:
        # Scheme and host are case-insensitive (RFC 3986 6.2.2.1); the path is not.
        return f"http://{self.authority.lower()}{self.path}"


def parse_proxy_request(head: bytes) -> ProxyRequest:
    """A request head sent to a proxy; ``HttpParseError`` names the status to answer."""
    if len(head) > MAX_HEAD:
        raise HttpParseError(431, f"head longer than {MAX_HEAD} bytes")
    # latin-1 never fails, so odd bytes surface as a parse error below.
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HttpParseError(400, "empty head")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpParseError(400, f"malformed request line {lines[0]!r}")
    method, target, version = parts
    if not version.startswith("HTTP/"):
        raise HttpParseError(400, f"malformed request line {lines[0]!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpParseError(505, f"unsupported version {version!r}")
    if method == "CONNECT":
        raise HttpParseError(501, "CONNECT tunnels are not offered; use the SOCKS5 proxy")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise HttpParseError(400, f"malformed header line {line!r}")
        fields.append((name, value.strip()))
    host, port, path = split_absolute_uri(target)
    headers = {name.lower(): value for name, value in fields}
    return ProxyRequest(method, host, port, path, version, tuple(fields), headers)


def split_absolute_uri(target: str) -> tuple[str, int, str]:
    """host (lower-cased), port and origin-form of an absolute-form target (RFC 7230 5.3.2).

    ``HttpParseError`` names the status: 400 for anything but an absolute
    URI (origin-, asterisk- and authority-form included), 501 for another
    scheme.  Shared by both HTTP proxies.
    """
    if target.startswith("/"):
        raise HttpParseError(400, f"{target!r} is not an absolute URI; this is a proxy")
    scheme, sep, _ = target.partition("://")
    if not sep:
        raise HttpParseError(400, f"{target!r} is not an absolute URI")
    if scheme.lower() != "http":
        raise HttpParseError(501, f"scheme {scheme!r} is not supported")
    try:
        parts = urlsplit(target)
        port = parts.port or 80
    except ValueError as exc:
        raise HttpParseError(400, f"bad URI {target!r}: {exc}") from None
    if parts.username is not None or not parts.hostname:
        raise HttpParseError(400, f"bad authority in {target!r}")
    path = parts.path or "/"  # RFC 7230 5.3.1: an empty path is sent as "/"
    if parts.query:
        path += "?" + parts.query
    # The fragment is the client's business and never sent (RFC 7230 5.1).
    return parts.hostname, port, path


def origin_request(request: ProxyRequest) -> bytes:
    """The request rewritten for the origin: origin-form, HTTP/1.0, no hop-by-hop fields.

    Host is replaced by the URI's authority (RFC 7230 5.4), fields named in
    Connection are dropped with the hop-by-hop set (RFC 7230 6.1), and
    ``Connection: close`` because the splice carries one exchange only.
    """
    named = {
        token.strip().lower()
        for token in request.headers.get("connection", "").split(",")
        if token.strip()
    }
    drop = _HOP_BY_HOP | named | {"host"}
    lines = [f"{request.method} {request.path} HTTP/1.0", f"Host: {request.authority}"]
    lines += [f"{name}: {value}" for name, value in request.fields if name.lower() not in drop]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fill_request(request: ProxyRequest) -> bytes:
    """The proxy's own GET for the cache: no client fields (cookies are not for sharing)."""
    return (
        f"GET {request.path} HTTP/1.0\r\nHost: {request.authority}\r\n"
        "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")


def error_response(status: int, message: str) -> bytes:
    body = f"{status} {_REASONS.get(status, 'Error')}: {message}\n".encode("latin-1", "replace")
    head = (
        f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def hit_response_head(obj: CachedObject) -> bytes:
    lines = ["HTTP/1.0 200 OK"]
    if obj.content_type is not None:
        lines.append(f"Content-Type: {obj.content_type}")
    lines += [f"Content-Length: {len(obj.body)}", "Connection: close", "X-Cache: HIT"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_for_connect_error(code: str) -> int:
    """504 when the origin did not answer in time, 502 for every other failure (RFC 7231 6.6)."""
    return 504 if code == "ETIMEDOUT" else 502


# -- the I/O shell (asyncio: proxies.aio_shell over daemon.api.aio) --------------------


@dataclass(slots=True)
class HttpProxy:
    """What the client tasks share: the configuration and the cache (one thread: no lock)."""

    cache: ObjectCache
    connect_timeout: float = 10.0
    source: str | None = None
    filling: set[str] = field(default_factory=set)  # keys being fetched right now
    fills: set[asyncio.Task[None]] = field(default_factory=set)  # a reference per running fill

    def lookup(self, key: str) -> CachedObject | None:
        return self.cache.get(key, time.monotonic())


async def _consume(conn: AsyncConnection, count: int) -> None:
    while count:
        chunk = await conn.recv(count)
        if not chunk:
            raise ConnectionError("EOF inside bytes already peeked")
        count -= len(chunk)


async def read_head(conn: AsyncConnection) -> bytes | None:
    """The request head and not one byte more (a body is the splice's); None at EOF.

    Peeked bytes that do not finish the head are consumed (they are all head),
    so the next peek waits for new data instead of spinning.
    """
    buffer = bytearray()
    while True:
        peeked = await conn.recv(MAX_HEAD, socket.MSG_PEEK)
        if not peeked:
            return None
        seen = buffer + peeked
        end = head_end(seen)
        if end >= 0:
            await _consume(conn, end - len(buffer))
            return bytes(seen[:end])
        if len(seen) >= MAX_HEAD:
            raise HttpParseError(431, f"head longer than {MAX_HEAD} bytes")
        await _consume(conn, len(peeked))
        buffer = seen


async def answer_and_close(client: AsyncConnection, data: bytes) -> None:
    """Write a response we produced ourselves, then FIN, drain, close (no RST)."""
    try:
        await client.sendall(data)
    except OSError as exc:
        log.debug("client %s gone before its response: %s", client.peer, exc)
    await close_gently(client)


async def serve_client(api: AsyncSpliceClient, client: AsyncConnection, proxy: HttpProxy) -> None:
    """One client, from accept to splice or cache answer (its own task)."""
    peer = client.peer
    try:
        async with asyncio.timeout(HEAD_TIMEOUT):
            head = await read_head(client)
        if head is None:
            client.release()
            return
        request = parse_proxy_request(head)
    except HttpParseError as exc:
        log.info("bad request from %s: %d %s", peer, exc.status, exc.message)
        await answer_and_close(client, error_response(exc.status, exc.message))
        return
    except (OSError, TimeoutError) as exc:
        log.info("client %s dropped before its request: %s", peer, exc or "timeout")
        client.release()
        return
    key = request.cache_key
    cacheable = request_is_cacheable(request.method, request.headers)
    if cacheable and (obj := proxy.lookup(key)) is not None:
        log.info("%s %s HIT", request.method, key)
        await answer_and_close(client, hit_response_head(obj) + obj.body)
        return
    try:
        remotes = await destinations_async(request.host, request.port, proxy.source)
    except (socket.gaierror, ValueError) as exc:
        await answer_and_close(client, error_response(502, f"cannot resolve {request.host}: {exc}"))
        return
    if not await splice_to_origin(api, client, request, remotes, proxy):
        return
    log.info("%s %s MISS (spliced)", request.method, key)
    if cacheable and key not in proxy.filling:
        # Concurrent misses for one URL fetch it once.
        proxy.filling.add(key)
        task = asyncio.create_task(fill(api, request, remotes, proxy))
        proxy.fills.add(task)
        task.add_done_callback(proxy.fills.discard)


async def splice_to_origin(
    api: AsyncSpliceClient,
    client: AsyncConnection,
    request: ProxyRequest,
    remotes: list[tuple[str, int]],
    proxy: HttpProxy,
) -> bool:
    """Fig. 4.3's miss path; True once the daemon relays the exchange."""
    try:
        server = await api.intend_splice(client)
    except SpliceError as exc:
        log.info("intend_splice for %s failed: %s", client.peer, exc)
        await refuse_intended(
            client, error_response(502, "the proxy could not take the connection")
        )
        return False
    try:
        await connect_server(server, remotes, proxy.source, proxy.connect_timeout)
    except SpliceError as exc:
        status = status_for_connect_error(exc.code)
        log.info("connect %s failed: %s -> %d", request.authority, exc, status)
        server.release()
        await refuse_intended(client, error_response(status, f"{request.authority}: {exc.code}"))
        return False
    try:
        # Written before the splice, the last time the proxy may write to the server fd.
        await server.sendall(origin_request(request))
        await api.splice(client, server, 0)
    except (SpliceError, OSError) as exc:
        log.warning("splice %s <-> %s failed: %s", client.peer, server.peer, exc)
        server.release()
        await refuse_intended(client, error_response(502, "splice failed"))
        return False
    client.release()
    server.release()
    return True


async def fill(
    api: AsyncSpliceClient,
    request: ProxyRequest,
    remotes: list[tuple[str, int]],
    proxy: HttpProxy,
) -> None:
    """Fetch ``request``'s URL on the proxy's own connection and cache it if allowed.

    The stand-in for thesis 4.4's TCP tap: one extra fetch per cacheable miss.
    The caller marked the key as ``filling``; this unmarks it.
    """
    key = request.cache_key
    conn: AsyncConnection | None = None
    try:
        for remote in remotes:
            try:
                local = local_for(proxy.source, remote)
                conn = await api.connect(remote, local=local, timeout=proxy.connect_timeout)
                break
            except DaemonGone:
                raise
            except SpliceError as exc:
                log.debug("fill: connect %s:%d failed: %s", remote[0], remote[1], exc)
        if conn is None:
            return
        await conn.sendall(fill_request(request))
        obj = await _read_cacheable(conn, proxy.cache.max_object, key)
        if obj is not None:
            stored = proxy.cache.put(key, obj)
            log.info("fill %s: %d bytes %s", key, len(obj.body), "stored" if stored else "too big")
    except (SpliceError, OSError, HttpParseError, TimeoutError) as exc:
        log.info("fill %s failed: %s", key, exc or "timeout")
    finally:
        proxy.filling.discard(key)
        if conn is not None:
            conn.release()


async def _recv(conn: AsyncConnection, size: int) -> bytes:
    async with asyncio.timeout(FILL_TIMEOUT):
        return await conn.recv(size)


async def _read_cacheable(conn: AsyncConnection, max_object: int, key: str) -> CachedObject | None:
    """The response on ``conn`` as a cache object, or None if it must not be stored."""
    data = bytearray()
    while (end := head_end(data)) < 0:
        if len(data) > MAX_HEAD:
            raise HttpParseError(502, "response head too long")
        chunk = await _recv(conn, 65536)
        if not chunk:
            raise HttpParseError(502, "response ended inside its head")
        data += chunk
    head = parse_response_head(data[:end])
    decision = response_is_storable(head.status, head.headers, max_object)
    if not decision.store:
        log.info("fill %s: not stored (%s)", key, decision.reason)
        return None
    length = int(head.headers["content-length"])
    body = data[end:]
    while len(body) < length:
        chunk = await _recv(conn, min(length - len(body), 1 << 20))
        if not chunk:
            raise HttpParseError(502, f"body ended after {len(body)} of {length} bytes")
        body += chunk
    expires = None if decision.max_age is None else time.monotonic() + decision.max_age
    return CachedObject(bytes(body[:length]), head.headers.get("content-type"), expires)


def byte_count(text: str) -> int:
    """argparse type of a byte count (both HTTP proxies' size options)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a byte count, got {text!r}")
    return int(text)


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, HttpProxy]:
    parser = argparse.ArgumentParser(
        prog="python -m proxies.http_proxy",
        description="HTTP/1.0 forward proxy: cache hits served, misses spliced by the daemon.",
    )
    parser.add_argument("--daemon", required=True, metavar="SOCKET_PATH")
    add_listen_option(parser, " (a daemon address)")
    parser.add_argument("--source", metavar="ADDR", help="daemon address to connect from")
    parser.add_argument(
        "--cache-max-object", type=byte_count, default=DEFAULT_MAX_OBJECT, metavar="BYTES"
    )
    parser.add_argument(
        "--cache-max-bytes", type=byte_count, default=DEFAULT_MAX_BYTES, metavar="BYTES"
    )
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S")
    parser.add_argument("--log-level", default="WARNING", metavar="L")
    args = parser.parse_args(argv)
    check_source(parser, args.source)
    if args.connect_timeout <= 0:
        parser.error("--connect-timeout must be positive")
    cache = ObjectCache(args.cache_max_object, args.cache_max_bytes)
    return args, HttpProxy(cache, args.connect_timeout, args.source)


def main(argv: list[str] | None = None) -> int:
    args, proxy = _parse_args(argv)
    return run_proxy(
        PROG,
        daemon=args.daemon,
        listen=args.listen[0],
        more_listen=args.listen[1:],
        log_level=args.log_level,
        serve_client=lambda api, client: serve_client(api, client, proxy),
    )


if __name__ == "__main__":
    sys.exit(main())
