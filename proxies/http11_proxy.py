"""HTTP/1.1 forward proxy: persistent connections, every response body spliced.

    python -m proxies.http11_proxy --daemon SOCKET --listen ADDR:PORT [--deny FILE] ...

Read first: RFC 9112 (HTTP/1.1) sections 3.2 (request-target forms), 6.3
(message body length), 9.3 (persistence) and 9.3.1 (retrying requests);
RFC 9110 sections 7.6 (Connection, Via), 9.3.6 (CONNECT), 10.1.1 (Expect)
and 15.2 (1xx); h11's docs; ``proxies/http_proxy.py``, the HTTP/1.0 proxy
beside this one, and ``proxies/http_cache.py``.

Theory of operation
-------------------
The HTTP/1.0 proxy splices a whole connection after its one request (thesis
Fig. 4.3). A persistent HTTP/1.1 connection carries many exchanges, and the
proxy must see every request on it (to apply its access rules, to answer
from its cache, to pick the origin), so here the proxy keeps both
connections and splices each response *body* only: the daemon's bounded
splice (``splice_bounded``, thesis 7.1's asymmetric splice) relays exactly
the body's bytes of the server's stream to the client and hands both
connections back. Per client connection, request after request::

    client --request--> proxy (h11, SERVER role)
        deny rule       403, next request
        cache hit       the stored object, X-Cache: HIT, next request
        CONNECT         200, then an ordinary splice for the connection's lifetime
        otherwise       forwarded in origin-form on the server connection
    origin --response head--> proxy (h11, CLIENT role; exactly the head, see below)
        Content-Length  head to the client, splice_bounded(server_limit=L)
        no body         (HEAD, 1xx, 204, 304) head only
        chunked, or     copied by the proxy through h11: re-chunked for an
        close-delimited HTTP/1.1 client, close-delimited for an HTTP/1.0 one

Only a response with a Content-Length is spliced: the daemon's limit is a
byte count, and the end of a chunked body is known only by parsing it. The
same goes for a close-delimited body (RFC 9112 6.3 rule 8), which could be
spliced to the end of the connection, but copying it keeps the client's
connection (an HTTP/1.1 client gets it chunked).

Exactly the head. The proxy peeks at the server fd (``MSG_PEEK``) and
consumes only the response head, so the body stays in the daemon and the
whole of it is relayed by the splice; bytes the daemon had already put in
the fd are written to the client by ``splice_bounded`` before the splice
(in order: the head first). Bytes past the body that the splice hands back
(``server_extra``) and client bytes that arrived meanwhile
(``client_extra``, e.g. pipelined requests: with ``client_limit=0`` none of
them reach the origin) are kept ahead of anything read later.

Why a fresh h11 connection per exchange. h11 cannot be told that a body
went past it, so after a splice both of its state machines would wait for
a body forever. Each exchange gets new ones: on the client side fed with
the bytes the previous one had buffered and not parsed (pipelined
requests, ``trailing_data``), on the server side fed with the head alone.
The persistence decisions h11 would make from there are made here, by
``client_keeps_alive`` and ``origin_keeps_alive`` (RFC 9112 9.3).

What the proxy copies itself rather than splicing: request bodies (it
reads them from the client and writes them to the origin before reading
the response head, so an origin that answers only after the whole body
cannot deadlock against a splice that has not started yet; the proxy
answers ``Expect: 100-continue`` itself for the same reason, RFC 9110
10.1.1), chunked and close-delimited responses, cache hits and its own
answers (400, 403, 502, 504, 505).

The cache is filled through the daemon's TCP tap (thesis 4.4): a copy of
the spliced bytes comes back to the proxy, so a cacheable miss costs the
origin one transfer (the HTTP/1.0 proxy fetches it a second time). An
object is stored only if the tap saw the whole body.

Not done: HTTP/1.0 keep-alive (an HTTP/1.0 client's connection closes
after its response), Upgrade (never forwarded), proxy authentication, DNS
in the deny rules (a host is matched as the client wrote it). A body the
origin cuts short is noticed at once only on a tapped splice (``cut_short``);
otherwise the client learns it when its idle connection is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import re
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

import h11

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
from proxies.http_proxy import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_OBJECT,
    byte_count,
    split_absolute_uri,
    status_for_connect_error,
)
from proxies.socks5 import add_listen_option
from servers.http1 import MAX_HEAD, HttpParseError

log = logging.getLogger("proxies.http11_proxy")

PROG = "http11_proxy"
RECV_SIZE = 65536
ORIGIN_RCVBUF = 65536  # see Http11Proxy.origin_rcvbuf
IDLE_TIMEOUT = 30.0  # a client silent this long between (or inside) requests is closed
RESPONSE_TIMEOUT = 60.0  # per read while waiting for the origin; then 504
VIA = b"tcp-splice"  # our pseudonym in Via (RFC 9110 7.6.3)
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

# RFC 9110 7.6.1: connection-specific fields, never forwarded (plus the
# de-facto Proxy-Connection, and the Proxy-* pair: this proxy does no proxy
# authentication, and credentials for it are not the origin's business).
# Transfer-Encoding is among them: h11 reframes every body it carries.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# RFC 9110 9.2.2: the methods a proxy may send twice (GET, HEAD, OPTIONS and
# TRACE are safe; PUT and DELETE idempotent).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# h11's end of a head: a line feed, an optional CR, a line feed.
_BLANK_LINE = re.compile(rb"\n\r?\n")

Fields = list[tuple[bytes, bytes]]


# -- sans-I/O: targets, access rules, rewriting, framing, persistence ---------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request goes: the host as the client named it (lower-cased) and a port."""

    host: str  # a name, or an IP literal without brackets
    port: int

    @property
    def authority(self) -> str:
        """host[:port] for Host (RFC 9110 7.2), brackets around IPv6, port 80 left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    """An absolute-form request-target, split into the origin and the origin-form."""

    origin: Origin
    path: str  # path and query, as sent to the origin (RFC 9112 3.2.1)

    @property
    def cache_key(self) -> str:
        # As proxies.http_proxy's: scheme and host are case-insensitive, the path is not.
        return f"http://{self.origin.authority}{self.path}"


def parse_target(target: bytes) -> Target:
    """An absolute-form target (RFC 9112 3.2.2); ``HttpParseError`` names the status."""
    # h11 admits visible ASCII only; the rules are the HTTP/1.0 proxy's.
    host, port, path = split_absolute_uri(target.decode("ascii", "replace"))
    return Target(Origin(host, port), path)


def parse_authority(target: bytes) -> Origin:
    """CONNECT's authority-form target, host:port with the port required (RFC 9112 3.2.3)."""
    text = target.decode("ascii", "replace")
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError as exc:
        raise HttpParseError(400, f"bad CONNECT target {text!r}: {exc}") from None
    if port is None or not parts.hostname or parts.username is not None:
        raise HttpParseError(400, f"CONNECT needs host:port, got {text!r}")
    if parts.path or parts.query or parts.fragment:
        raise HttpParseError(400, f"CONNECT needs host:port, got {text!r}")
    return Origin(parts.hostname.lower(), port)


@dataclass(frozen=True, slots=True)
class DenyRule:
    """``host`` (every request to it, tunnels too) or ``host/path-prefix``."""

    host: str
    path_prefix: str | None = None

    def matches(self, host: str, path: str | None) -> bool:
        """Does the rule deny ``host``'s ``path`` (None: a tunnel, whose paths are unseen)?"""
        if host != self.host:
            return False
        if self.path_prefix is None:
            return True
        return path is not None and path.startswith(self.path_prefix)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host + (self.path_prefix or "")


@dataclass(frozen=True, slots=True)
class DenyList:
    """The access rule: requests matching any rule are answered 403.

    Hosts are compared as the client wrote them, lower-cased: a rule for a
    name does not cover the same host asked for by address (no DNS here).
    Path prefixes are compared with the path and query as sent, byte for byte.
    """

    rules: tuple[DenyRule, ...] = ()

    @classmethod
    def parse(cls, text: str) -> DenyList:
        """One rule a line, ``#`` starts a comment; ``ValueError`` names a bad line."""
        rules = []
        for number, line in enumerate(text.splitlines(), 1):
            rule = line.partition("#")[0].strip()
            if not rule:
                continue
            if any(c.isspace() for c in rule):
                raise ValueError(f"line {number}: one rule a line, got {rule!r}")
            if rule.startswith("["):  # an IPv6 literal, as in a URI
                host, bracket, path = rule[1:].partition("]")
                if not bracket or (path and not path.startswith("/")):
                    raise ValueError(f"line {number}: bad IPv6 rule {rule!r}")
            else:
                host, slash, path = rule.partition("/")
                path = slash + path
            if not host or "://" in rule:
                raise ValueError(f"line {number}: expected host or host/path, got {rule!r}")
            rules.append(DenyRule(host.lower(), path or None))
        return cls(tuple(rules))

    def match(self, host: str, path: str | None) -> DenyRule | None:
        return next((rule for rule in self.rules if rule.matches(host, path)), None)


def comma_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """A comma-separated field's members, lower-cased, over all its lines (RFC 9110 5.6.1)."""
    return [
        token.strip().lower()
        for field_name, value in headers
        if field_name.lower() == name
        for token in value.split(b",")
        if token.strip()
    ]


def _field(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = None
    for field_name, value in headers:
        if field_name.lower() == name:
            found = value
    return found


def _header_dict(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-cased names to values (last wins), as ``proxies.http_cache`` takes them."""
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}


def _via(version: bytes) -> tuple[bytes, bytes]:
    # RFC 9110 7.6.3: the protocol version of the message as we received it.
    return (b"Via", version + b" " + VIA)


def _forwardable(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes]) -> Fields:
    """The fields minus hop-by-hop ones and those named in Connection (RFC 9110 7.6.1)."""
    fields = list(raw)
    named = frozenset(comma_tokens(fields, b"connection"))
    return [(name, value) for name, value in fields if name.lower() not in drop | named]


def request_has_body(request: h11.Request) -> bool:
    """RFC 9112 6.1/6.2: a request has a body iff Transfer-Encoding or Content-Length > 0."""
    if comma_tokens(request.headers, b"transfer-encoding"):
        return True
    length = _field(request.headers, b"content-length")
    return length is not None and length.strip() not in (b"", b"0")


def forward_request(request: h11.Request, target: Target) -> h11.Request:
    """The request as the origin gets it: origin-form, HTTP/1.1, no hop-by-hop fields.

    Host is the target's authority (RFC 9112 3.2.2: a proxy replaces it), a
    Via names us, and the framing is restated for h11, which frames the
    body the proxy copies (chunked stays chunked). ``Expect: 100-continue``
    stops here: the proxy answers it itself (module docstring).
    """
    drop = _HOP_BY_HOP | {b"host", b"content-length"}
    if comma_tokens(request.headers, b"expect") == [b"100-continue"]:
        drop |= {b"expect"}
    fields: Fields = [(b"Host", target.origin.authority.encode("ascii"))]
    fields += _forwardable(request.headers.raw_items(), drop)
    if comma_tokens(request.headers, b"transfer-encoding"):
        fields.append((b"Transfer-Encoding", b"chunked"))  # h11 admits chunked only
    elif (length := _field(request.headers, b"content-length")) is not None:
        fields.append((b"Content-Length", length))
    fields.append(_via(request.http_version))
    return h11.Request(method=request.method, target=target.path.encode("ascii"), headers=fields)


class BodyKind(enum.Enum):
    NONE = "none"  # no body whatever the fields say
    LENGTH = "length"  # Content-Length bytes: spliced
    CHUNKED = "chunked"  # copied through h11
    UNTIL_CLOSE = "until-close"  # the origin's close ends it: copied through h11


@dataclass(frozen=True, slots=True)
class ResponseFraming:
    kind: BodyKind
    length: int = 0  # for LENGTH


def response_framing(
    method: bytes, status: int, headers: Iterable[tuple[bytes, bytes]]
) -> ResponseFraming:
    """How a response's body is delimited: RFC 9112 6.3's rules, in its order."""
    fields = list(headers)
    # Rule 1: HEAD, 1xx, 204 and 304 have no body, whatever the fields say.
    # (Rule 2, a 2xx to CONNECT, does not arise: CONNECT is never forwarded.)
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return ResponseFraming(BodyKind.NONE)
    # Rules 3-4: Transfer-Encoding overrides Content-Length; chunked last is
    # chunked, anything else in a response is read until the close.
    codings = comma_tokens(fields, b"transfer-encoding")
    if codings:
        chunked = codings[-1] == b"chunked"
        return ResponseFraming(BodyKind.CHUNKED if chunked else BodyKind.UNTIL_CLOSE)
    # Rules 5-6: a valid Content-Length (repeated only with the same value).
    lengths = {value.strip() for name, value in fields if name.lower() == b"content-length"}
    if lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise HttpParseError(502, f"bad Content-Length {sorted(lengths)!r} from the origin")
        return ResponseFraming(BodyKind.LENGTH, int(next(iter(lengths))))
    return ResponseFraming(BodyKind.UNTIL_CLOSE)  # rule 8


def client_keeps_alive(request: h11.Request) -> bool:
    """RFC 9112 9.3: an HTTP/1.1 request keeps the connection unless it says close.

    HTTP/1.0's ``Connection: keep-alive`` (RFC 9112 C.2.2) is not honoured:
    after answering an HTTP/1.0 client the proxy closes.
    """
    return request.http_version == b"1.1" and b"close" not in comma_tokens(
        request.headers, b"connection"
    )


def origin_keeps_alive(response: h11.Response, framing: ResponseFraming) -> bool:
    """May the server connection carry our next request (RFC 9112 9.3)?"""
    if framing.kind is BodyKind.UNTIL_CLOSE:
        return False
    return response.http_version == b"1.1" and b"close" not in comma_tokens(
        response.headers, b"connection"
    )


def forward_response(
    response: h11.Response | h11.InformationalResponse, framing: ResponseFraming, *, close: bool
) -> h11.Response | h11.InformationalResponse:
    """The origin's response head as the client gets it: no hop-by-hop fields, a Via.

    Content-Length stays when the body is spliced (LENGTH) or absent (NONE:
    for HEAD and 304 it describes the representation, RFC 9110 8.6); a body
    the proxy copies is reframed by h11, so its framing fields go. ``close``
    announces that the proxy closes the client's connection after it.
    """
    drop = _HOP_BY_HOP
    if framing.kind in (BodyKind.CHUNKED, BodyKind.UNTIL_CLOSE):
        drop = drop | {b"content-length"}
    fields = _forwardable(response.headers.raw_items(), drop)
    fields.append(_via(response.http_version))
    if isinstance(response, h11.InformationalResponse):
        return h11.InformationalResponse(
            status_code=response.status_code, headers=fields, reason=response.reason
        )
    if close:
        fields.append((b"Connection", b"close"))
    return h11.Response(status_code=response.status_code, headers=fields, reason=response.reason)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def proxy_response(status: int, message: str, *, head_only: bool = False, close: bool) -> bytes:
    """An answer of the proxy's own (an error or a 403) with a short text body.

    No body for a HEAD request (RFC 9110 9.3.2), with the Content-Length it
    would have had.
    """
    body = f"{status} {_reason(status)}: {message}\n".encode("latin-1", "replace")
    head = (
        f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


def hit_response(obj: CachedObject, *, close: bool) -> bytes:
    """A cache hit, ``X-Cache: HIT`` (GET only: the cache takes no other method)."""
    lines = ["HTTP/1.1 200 OK"]
    if obj.content_type is not None:
        lines.append(f"Content-Type: {obj.content_type}")
    lines += [f"Content-Length: {len(obj.body)}", "X-Cache: HIT"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + obj.body


def head_length(buffer: bytes | bytearray) -> int:
    """Length of the head at the start of ``buffer``, blank line included; -1 if incomplete."""
    found = _BLANK_LINE.search(buffer)
    return -1 if found is None else found.end()


@dataclass(slots=True)
class BodyTap:
    """The TCP tap's copy of a spliced body, for the cache; it gives up past ``limit``."""

    limit: int
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False

    def __call__(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflow = True
            self.parts.clear()
            return
        self.parts.append(chunk)


def tapped_body(
    written: bytes, tap: BodyTap, result: dict[str, object], length: int
) -> bytes | None:
    """The body to store after a tapped splice, or None if the copy may be incomplete.

    ``written``: the body bytes the proxy wrote itself before the splice;
    the tap saw the rest. Stored only when the daemon says the tap did not
    stop early and the whole Content-Length is there.
    """
    tapped = result.get("tapped")
    if not isinstance(tapped, int) or result.get("tap_overflow") or tap.overflow:
        return None
    if tapped != tap.size or len(written) + tap.size != length:
        return None
    return written + b"".join(tap.parts)


def cut_short(result: dict[str, object], limit: int) -> int | None:
    """The bytes a tapped bounded splice carried if fewer than ``limit``, else None.

    The origin's FIN before the body's end ends a bounded splice there
    (docs/api.md). Only a tap counts every byte the client got: the
    event's ``bytes_s2c`` leaves out those the daemon had received before
    the splice, so an untapped short body is found by the idle timeout.
    An overflowed tap stopped counting early: no verdict.
    """
    tapped = result.get("tapped")
    if not isinstance(tapped, int) or result.get("tap_overflow") or tapped >= limit:
        return None
    return tapped


# -- the I/O shell (asyncio: proxies.aio_shell over daemon.api.aio) --------------------


@dataclass(slots=True)
class Http11Proxy:
    """What the client tasks share: the configuration and the cache (one thread: no lock)."""

    cache: ObjectCache
    deny: DenyList = field(default_factory=DenyList)
    connect_timeout: float = 10.0
    idle_timeout: float = IDLE_TIMEOUT
    response_timeout: float = RESPONSE_TIMEOUT
    source: str | None = None
    # Bodies shorter than this are copied through the proxy, not spliced: a
    # splice costs three API round trips, a short copy less (0: splice all;
    # a huge value: the plain copying proxy the experiments compare with).
    splice_min: int = 0
    # Receive buffering of origin connections (the daemon's connect rcvbuf):
    # what the daemon takes in ahead of the proxy reading a head crosses at
    # the splice through Python; what waits at the origin is relayed by the
    # kernel.  0: the daemon's default (what a copying proxy wants).
    origin_rcvbuf: int = ORIGIN_RCVBUF


class Outcome(enum.Enum):
    KEEP = "keep"  # the client's connection carries the next request
    CLOSE = "close"  # FIN after the response (the proxy or the client said close)
    GONE = "gone"  # the connection is spliced away, reset or closed already


class OriginFailed(Exception):
    """The origin did not answer; ``status`` for the client (502, 504).

    ``retry``: the failure came on a reused connection before one byte of
    the response, the case RFC 9112 9.3.1 lets a proxy retry.
    """

    def __init__(self, status: int, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry = retry


@dataclass(slots=True)
class OriginLink:
    """The proxy's connection to one origin, kept between a client's requests."""

    origin: Origin
    conn: AsyncConnection
    buffer: bytearray = field(default_factory=bytearray)  # read from the fd, not yet used
    responses: int = 0  # completed on this connection

    def idle_and_open(self) -> bool:
        """No FIN, no stray bytes: the next request may go out on it.

        A non-blocking peek: nothing is consumed, so the byte count
        ``splice_bounded`` relies on stays right.
        """
        if self.buffer:
            return False
        try:
            self.conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF, or bytes nobody asked for


async def _consume(conn: AsyncConnection, count: int) -> None:
    while count:
        chunk = await conn.recv(count)
        if not chunk:
            raise ConnectionError("EOF inside bytes already peeked")
        count -= len(chunk)


async def connect_origin(
    api: AsyncSpliceClient,
    remotes: list[tuple[str, int]],
    source: str | None,
    timeout: float,
    rcvbuf: int | None = None,
) -> AsyncConnection:
    """A connection of the proxy's own to the first address that answers."""
    first_error: SpliceError | None = None
    for remote in remotes:
        try:
            local = local_for(source, remote)
            return await api.connect(remote, local=local, timeout=timeout, rcvbuf=rcvbuf)
        except DaemonGone:
            raise
        except SpliceError as exc:
            log.debug("connect %s:%d failed: %s", remote[0], remote[1], exc)
            first_error = first_error or exc
    raise first_error or SpliceError("EHOSTUNREACH", "no address")


class ClientSession:
    """One client connection, request after request, and its server connection."""

    __slots__ = ("api", "client", "eof", "extra", "http", "link", "pending", "proxy")

    def __init__(self, api: AsyncSpliceClient, client: AsyncConnection, proxy: Http11Proxy):
        self.api = api
        self.client = client
        self.proxy = proxy
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.pending = b""  # read from the client, not parsed (pipelined requests)
        self.eof = False  # the client's FIN is among what was read
        self.extra = bytearray()  # client_extra from splices: after h11's buffer
        self.link: OriginLink | None = None

    async def run(self) -> None:
        try:
            while (outcome := await self._next_exchange()) is Outcome.KEEP:
                data, closed = self.http.trailing_data
                self.pending = data + bytes(self.extra)
                self.eof = closed
                self.extra.clear()
        except DaemonGone:
            return  # the shell reports it and exits
        except OSError as exc:
            log.debug("client %s gone: %s", self.client.peer, exc)
            outcome = Outcome.GONE
        finally:
            self._drop_link()
        if outcome is Outcome.CLOSE:
            await close_gently(self.client)
        else:
            self.client.release()

    # -- the client side ----------------------------------------------------------------

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The client's next h11 event, reading when h11 needs more (idle timeout)."""
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            async with asyncio.timeout(self.proxy.idle_timeout):
                data = await self.client.recv(RECV_SIZE)
            self.http.receive_data(data)  # b"": the FIN

    def _request_done(self) -> bool:
        """Discard what h11 holds of the request body; True if it all arrived (no I/O)."""
        while self.http.their_state is h11.SEND_BODY:
            if self.http.next_event() is h11.NEED_DATA:
                return False
        return True

    async def _answer(self, request: h11.Request, status: int, message: str) -> Outcome:
        """A response of our own; the connection goes on if the request was read whole."""
        close = not client_keeps_alive(request) or not self._request_done()
        head_only = request.method == b"HEAD"
        await self.client.sendall(proxy_response(status, message, head_only=head_only, close=close))
        return Outcome.CLOSE if close else Outcome.KEEP

    async def _next_exchange(self) -> Outcome:
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if self.pending:
            self.http.receive_data(self.pending)
        if self.eof:  # (receive_data(b"") is h11's EOF, so only now)
            self.http.receive_data(b"")
        try:
            event = await self._next_event()
        except TimeoutError:
            log.debug("client %s idle, closing", self.client.peer)
            return Outcome.CLOSE  # RFC 9112 9.5: a server may close an idle connection
        except h11.RemoteProtocolError as exc:
            log.info("bad request from %s: %s", self.client.peer, exc)
            status = exc.error_status_hint
            await self.client.sendall(proxy_response(status, str(exc), close=True))
            return Outcome.CLOSE
        if not isinstance(event, h11.Request):
            return Outcome.GONE  # ConnectionClosed: the client is done
        request = event
        if request.http_version not in (b"1.0", b"1.1"):
            version = request.http_version.decode("ascii", "replace")
            await self.client.sendall(proxy_response(505, f"HTTP/{version}", close=True))
            return Outcome.CLOSE
        if request.method == b"CONNECT":
            return await self._tunnel(request)
        try:
            target = parse_target(request.target)
        except HttpParseError as exc:
            log.info("refused %s from %s: %d %s", request.target, self.client.peer, exc.status, exc)
            return await self._answer(request, exc.status, exc.message)
        method = request.method.decode("ascii")
        key = target.cache_key
        rule = self.proxy.deny.match(target.origin.host, target.path)
        if rule is not None:
            log.info("%s %s DENIED (%s)", method, key, rule)
            return await self._answer(request, 403, f"denied by the proxy's rule {rule}")
        headers = _header_dict(request.headers)
        cacheable = request_is_cacheable(method, headers)
        if cacheable and (obj := self.proxy.cache.get(key, time.monotonic())) is not None:
            log.info("%s %s HIT", method, key)
            close = not client_keeps_alive(request) or not self._request_done()
            await self.client.sendall(hit_response(obj, close=close))
            return Outcome.CLOSE if close else Outcome.KEEP
        return await self._forward(request, target, cacheable)

    # -- a request to the origin ----------------------------------------------------------

    def _drop_link(self) -> None:
        if self.link is not None:
            self.link.conn.release()
            self.link = None

    async def _link_for(self, origin: Origin, remotes: list[tuple[str, int]]) -> OriginLink:
        """The server connection for ``origin``: the one we have if it is idle, else a new one."""
        link = self.link
        if link is not None and link.origin == origin and link.idle_and_open():
            return link
        self._drop_link()
        conn = await connect_origin(
            self.api,
            remotes,
            self.proxy.source,
            self.proxy.connect_timeout,
            self.proxy.origin_rcvbuf or None,
        )
        self.link = OriginLink(origin, conn)
        return self.link

    async def _forward(self, request: h11.Request, target: Target, cacheable: bool) -> Outcome:
        method = request.method.decode("ascii")
        key = target.cache_key
        origin = target.origin
        try:
            remotes = await destinations_async(origin.host, origin.port, self.proxy.source)
        except (OSError, ValueError) as exc:
            return await self._answer(request, 502, f"cannot resolve {origin.host}: {exc}")
        outgoing = forward_request(request, target)
        # A body the proxy copied is not kept, so only a request without one can go again.
        replayable = request.method in IDEMPOTENT and not request_has_body(request)
        for attempt in range(2):
            try:
                link = await self._link_for(origin, remotes)
            except SpliceError as exc:
                status = status_for_connect_error(exc.code)
                log.info("%s %s: connect failed: %s -> %d", method, key, exc, status)
                return await self._answer(request, status, f"{origin.authority}: {exc.code}")
            server_http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
            try:
                response = await self._exchange_head(request, outgoing, link, server_http)
            except OriginFailed as exc:
                self._drop_link()
                if exc.retry and attempt == 0 and replayable:
                    # RFC 9112 9.3.1: the origin closed a kept-alive connection
                    # as we reused it; an idempotent request goes again, once.
                    log.info("%s %s: %s; retrying on a new connection", method, key, exc)
                    continue
                log.info("%s %s: %d %s", method, key, exc.status, exc.message)
                return await self._answer(request, exc.status, exc.message)
            except _ClientFailed as exc:
                log.info("%s %s: the client's request body failed: %s", method, key, exc)
                self._drop_link()  # the origin has a part of a request
                await self.client.sendall(proxy_response(400, str(exc), close=True))
                return Outcome.CLOSE
            return await self._relay_response(request, response, link, server_http, key, cacheable)
        raise AssertionError("unreachable")

    async def _exchange_head(
        self,
        request: h11.Request,
        outgoing: h11.Request,
        link: OriginLink,
        server_http: h11.Connection,
    ) -> h11.Response:
        """Send the request (and copy its body); the origin's final response head.

        1xx responses are forwarded on the way (RFC 9110 15.2), except to an
        HTTP/1.0 client, which has none.
        """
        reused = link.responses > 0
        try:
            if not request_has_body(request):
                self._request_done()  # the EndOfMessage h11 has ready
                data = server_http.send(outgoing) + server_http.send(h11.EndOfMessage())
                await link.conn.sendall(data)
            else:
                await link.conn.sendall(server_http.send(outgoing))
                if self.http.they_are_waiting_for_100_continue:
                    go_on = h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue"
                    )
                    await self.client.sendall(self.http.send(go_on))
                await self._copy_request_body(link, server_http)
        except OSError as exc:
            raise OriginFailed(502, f"sending the request failed: {exc}", retry=reused) from None
        first = True
        while True:
            try:
                async with asyncio.timeout(self.proxy.response_timeout):
                    head = await self._read_head(link)
            except TimeoutError:
                raise OriginFailed(504, "no response from the origin in time") from None
            except OSError as exc:  # a reset: ECONNRESET on the fd
                retry = reused and first
                raise OriginFailed(502, f"the origin failed: {exc}", retry=retry) from None
            if head is None:
                raise OriginFailed(
                    502, "the origin closed the connection before answering", retry=reused and first
                )
            first = False
            server_http.receive_data(head)
            try:
                event = server_http.next_event()
            except h11.RemoteProtocolError as exc:
                raise OriginFailed(502, f"bad response head from the origin: {exc}") from None
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse) or event.status_code == 101:
                # 101 answers an Upgrade, which we never forward.
                raise OriginFailed(502, f"unexpected {event!r} from the origin")
            if request.http_version == b"1.1":
                informational = forward_response(event, ResponseFraming(BodyKind.NONE), close=False)
                await self.client.sendall(self.http.send(informational))

    async def _copy_request_body(self, link: OriginLink, server_http: h11.Connection) -> None:
        """The client's request body to the origin, reframed by h11 (proxy-copied)."""
        while True:
            try:
                event = await self._next_event()
            except (h11.RemoteProtocolError, TimeoutError) as exc:
                raise _ClientFailed(f"request body: {exc or 'timeout'}") from None
            if isinstance(event, h11.Data):
                await link.conn.sendall(server_http.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await link.conn.sendall(server_http.send(h11.EndOfMessage(headers=event.headers)))
                return
            else:
                raise _ClientFailed(f"request body: unexpected {event!r}")

    async def _read_head(self, link: OriginLink) -> bytes | None:
        """Exactly one response head from the server side; None if it closed before a byte.

        Peeks, and consumes only the head: the body stays for the splice.
        """
        while True:
            end = head_length(link.buffer)
            if end >= 0:
                head = bytes(link.buffer[:end])
                del link.buffer[:end]
                return head
            if len(link.buffer) > MAX_HEAD:
                raise OriginFailed(502, f"response head longer than {MAX_HEAD} bytes")
            peeked = await link.conn.recv(RECV_SIZE, socket.MSG_PEEK)
            if not peeked:
                if link.buffer:
                    raise OriginFailed(502, "the origin closed inside a response head")
                return None
            seen = link.buffer + peeked
            end = head_length(seen)
            if end >= 0:
                await _consume(link.conn, end - len(link.buffer))
                link.buffer.clear()
                return bytes(seen[:end])
            # All of it is head: take it, so the next peek waits for new bytes.
            await _consume(link.conn, len(peeked))
            link.buffer = seen

    # -- the response ---------------------------------------------------------------------

    async def _relay_response(
        self,
        request: h11.Request,
        response: h11.Response,
        link: OriginLink,
        server_http: h11.Connection,
        key: str,
        cacheable: bool,
    ) -> Outcome:
        method = request.method.decode("ascii")
        try:
            framing = response_framing(request.method, response.status_code, response.headers)
        except HttpParseError as exc:
            self._drop_link()
            return await self._answer(request, exc.status, exc.message)
        close = not client_keeps_alive(request)
        try:
            head = self.http.send(forward_response(response, framing, close=close))
        except h11.LocalProtocolError as exc:
            self._drop_link()
            return await self._answer(request, 502, f"response not forwardable: {exc}")
        if framing.kind is BodyKind.LENGTH and framing.length:
            outcome = await self._splice_body(
                request, response, link, head, framing.length, key, cacheable
            )
            how = "spliced"
        elif framing.kind is BodyKind.NONE or framing.kind is BodyKind.LENGTH:
            await self.client.sendall(head)
            outcome = Outcome.CLOSE if close else Outcome.KEEP
            how = "no body"
        else:
            await self.client.sendall(head)
            outcome = await self._copy_body(request, link, server_http)
            how = f"copied ({framing.kind.value})"
        log.info("%s %s %d MISS (%s)", method, key, response.status_code, how)
        if self.link is link:
            link.responses += 1
            if not origin_keeps_alive(response, framing) or link.buffer:
                self._drop_link()  # bytes past the response would be misread as the next one
        return outcome

    async def _splice_body(
        self,
        request: h11.Request,
        response: h11.Response,
        link: OriginLink,
        head: bytes,
        length: int,
        key: str,
        cacheable: bool,
    ) -> Outcome:
        """Head to the client, then the body through the daemon: exactly ``length`` bytes."""
        # Body bytes already read (past an earlier splice's limit) go out with the head.
        have = bytes(link.buffer[:length])
        del link.buffer[:length]
        await self.client.sendall(head + have)
        rest = length - len(have)
        storable = cacheable and (
            response_is_storable(
                response.status_code, _header_dict(response.headers), self.proxy.cache.max_object
            ).store
        )
        # The TCP tap (thesis 4.4) gives us a copy of what the daemon relays.
        tap = BodyTap(self.proxy.cache.max_object) if storable else None
        done: dict[str, object] = {"tapped": 0, "tap_overflow": False}
        if rest and rest < self.proxy.splice_min:
            if not await self._copy_exact(link, rest, tap):
                log.info("%s: the origin closed before the end of the body", key)
                self._drop_link()
                await self.client.abort()
                return Outcome.GONE
            done = {"tapped": 0 if tap is None else tap.size, "tap_overflow": False}
        elif rest:
            try:
                done = await self.api.splice_bounded(
                    self.client, link.conn, server_limit=rest, client_limit=0, on_tap=tap
                )
            except SpliceError as exc:
                # ECONNRESET: a peer reset mid-splice, and both conns are gone.
                log.info("splice for %s failed: %s", key, exc)
                self.link = None
                link.conn.release()
                return Outcome.GONE
            self.extra += _bytes(done.get("client_extra"))
            link.buffer += _bytes(done.get("server_extra"))
            if tap is not None and (got := cut_short(done, rest)) is not None:
                # The client has a short body, and only a reset tells it so
                # (its framing says more is due).
                log.info("%s: the origin closed after %d of %d bytes", key, got, rest)
                self._drop_link()
                await self.client.abort()
                return Outcome.GONE
        if tap is not None:
            self._store(key, response, tapped_body(have, tap, done, length))
        return Outcome.KEEP if client_keeps_alive(request) else Outcome.CLOSE

    async def _copy_exact(self, link: OriginLink, count: int, keep: BodyTap | None) -> bool:
        """Copy ``count`` body bytes origin -> client through the proxy (``--splice-min``)."""
        while count:
            try:
                async with asyncio.timeout(self.proxy.response_timeout):
                    data = await link.conn.recv(min(count, RECV_SIZE))
            except (TimeoutError, OSError):
                return False
            if not data:
                return False
            await self.client.sendall(data)
            if keep is not None:
                keep(data)
            count -= len(data)
        return True

    def _store(self, key: str, response: h11.Response, body: bytes | None) -> None:
        if body is None:
            log.info("fill %s: the tap did not see the whole body; not stored", key)
            return
        decision = response_is_storable(
            response.status_code, _header_dict(response.headers), self.proxy.cache.max_object
        )
        expires = None if decision.max_age is None else time.monotonic() + decision.max_age
        content_type = _field(response.headers, b"content-type")
        obj = CachedObject(
            body, None if content_type is None else content_type.decode("latin-1"), expires
        )
        stored = self.proxy.cache.put(key, obj)
        log.info("fill %s: %d bytes %s", key, len(body), "stored" if stored else "too big")

    async def _copy_body(
        self, request: h11.Request, link: OriginLink, server_http: h11.Connection
    ) -> Outcome:
        """A chunked or close-delimited body, through both h11 connections (proxy-copied)."""
        if link.buffer:  # (not b"": that is h11's EOF)
            server_http.receive_data(bytes(link.buffer))
            link.buffer.clear()
        # Trailers survive only into a chunked body (h11 chunks for HTTP/1.1 clients).
        trailers_fit = request.http_version == b"1.1"
        while True:
            try:
                event = server_http.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.proxy.response_timeout):
                        data = await link.conn.recv(RECV_SIZE)
                    server_http.receive_data(data)
                    continue
            except (h11.RemoteProtocolError, TimeoutError, OSError) as exc:
                # The head went out: the client can only learn it from a reset.
                log.info("origin body failed mid-response: %s", exc or "timeout")
                self._drop_link()
                await self.client.abort()
                return Outcome.GONE
            if isinstance(event, h11.Data):
                await self.client.sendall(self.http.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers) if trailers_fit else []
                await self.client.sendall(self.http.send(h11.EndOfMessage(headers=trailers)))
                break
        link.buffer += server_http.trailing_data[0]
        # h11 decided: an HTTP/1.0 client's close-delimited body ends with our close.
        if self.http.our_state is h11.MUST_CLOSE or not client_keeps_alive(request):
            return Outcome.CLOSE
        return Outcome.KEEP

    # -- CONNECT --------------------------------------------------------------------------

    async def _tunnel(self, request: h11.Request) -> Outcome:
        """CONNECT (RFC 9110 9.3.6): 200, then the daemon splices for the connection's life."""
        try:
            origin = parse_authority(request.target)
        except HttpParseError as exc:
            return await self._answer(request, exc.status, exc.message)
        rule = self.proxy.deny.match(origin.host, None)
        if rule is not None:
            log.info("CONNECT %s DENIED (%s)", origin.authority, rule)
            return await self._answer(request, 403, f"denied by the proxy's rule {rule}")
        if not self._request_done():  # RFC 9110 9.3.6: CONNECT has no content
            return await self._answer(request, 400, "CONNECT with a body")
        try:
            remotes = await destinations_async(origin.host, origin.port, self.proxy.source)
        except (OSError, ValueError) as exc:
            return await self._answer(request, 502, f"cannot resolve {origin.host}: {exc}")
        self._drop_link()  # the connection is a tunnel from now on
        early, _ = self.http.trailing_data  # sent behind the CONNECT: the tunnel's first bytes
        timeout = self.proxy.connect_timeout
        error: SpliceError | None = None
        if early:
            # Bytes we hold must reach the server before the splice: the three ops.
            server: AsyncConnection | None = None
            try:
                server = await self.api.intend_splice(self.client)
                await connect_server(server, remotes, self.proxy.source, timeout)
                await server.sendall(early)
                await self.api.splice(self.client, server, len(CONNECT_ESTABLISHED))
                await self.client.sendall(CONNECT_ESTABLISHED)
            except DaemonGone:
                raise
            except (SpliceError, OSError) as exc:
                error = exc if isinstance(exc, SpliceError) else SpliceError("EIO", str(exc))
            else:
                self.client.release()
            if server is not None:
                server.release()
        else:
            for remote in remotes:
                try:
                    await self.api.connect_splice(
                        self.client,
                        remote,
                        local=local_for(self.proxy.source, remote),
                        timeout=timeout,
                        data=CONNECT_ESTABLISHED,
                        release=True,
                    )
                    error = None
                    break
                except DaemonGone:
                    raise
                except SpliceError as exc:  # the client stays intended: try the next one
                    error = error or exc
        if error is not None:
            status = status_for_connect_error(error.code)
            log.info("CONNECT %s failed: %s -> %d", origin.authority, error, status)
            reply = proxy_response(status, f"{origin.authority}: {error.code}", close=True)
            await refuse_intended(self.client, reply)
            return Outcome.GONE
        ahead = f", {len(early)} bytes of the client's ahead of it" if early else ""
        log.info("CONNECT %s spliced%s", origin.authority, ahead)
        return Outcome.GONE


class _ClientFailed(Exception):
    """The client broke its request body (framing, timeout)."""


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else b""


async def serve_client(api: AsyncSpliceClient, client: AsyncConnection, proxy: Http11Proxy) -> None:
    """One client connection, from accept to its last request (its own task)."""
    await ClientSession(api, client, proxy).run()


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Http11Proxy]:
    parser = argparse.ArgumentParser(
        prog="python -m proxies.http11_proxy",
        description="HTTP/1.1 forward proxy: persistent connections, every response body "
        "with a Content-Length spliced by the daemon, a deny list, a cache.",
    )
    parser.add_argument("--daemon", required=True, metavar="SOCKET_PATH")
    add_listen_option(parser, " (a daemon address)")
    parser.add_argument("--source", metavar="ADDR", help="daemon address to connect from")
    parser.add_argument(
        "--deny",
        type=Path,
        metavar="FILE",
        help="access rules, one a line: host or host/path-prefix (# comments); answered 403",
    )
    parser.add_argument(
        "--cache-max-object", type=byte_count, default=DEFAULT_MAX_OBJECT, metavar="BYTES"
    )
    parser.add_argument(
        "--cache-max-bytes", type=byte_count, default=DEFAULT_MAX_BYTES, metavar="BYTES"
    )
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="S")
    parser.add_argument("--response-timeout", type=float, default=RESPONSE_TIMEOUT, metavar="S")
    parser.add_argument(
        "--splice-min",
        type=byte_count,
        default=0,
        metavar="BYTES",
        help="copy bodies shorter than this instead of splicing them (default 0: splice "
        "every body; a huge value makes a plain copying proxy, for comparisons)",
    )
    parser.add_argument(
        "--origin-rcvbuf",
        type=byte_count,
        default=ORIGIN_RCVBUF,
        metavar="BYTES",
        help="receive buffering of origin connections in the daemon (default %(default)s: "
        "a body waits at the origin and is spliced; 0: the daemon's default, for copying)",
    )
    parser.add_argument("--log-level", default="WARNING", metavar="L")
    args = parser.parse_args(argv)
    check_source(parser, args.source)
    if 0 < args.origin_rcvbuf < 4096 or args.origin_rcvbuf > 16 << 20:
        parser.error("--origin-rcvbuf must be 0 or 4096..16777216")
    for name in ("connect_timeout", "idle_timeout", "response_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    deny = DenyList()
    if args.deny is not None:
        try:
            deny = DenyList.parse(args.deny.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            parser.error(f"--deny {args.deny}: {exc}")
    cache = ObjectCache(args.cache_max_object, args.cache_max_bytes)
    proxy = Http11Proxy(
        cache,
        deny,
        args.connect_timeout,
        args.idle_timeout,
        args.response_timeout,
        args.source,
        args.splice_min,
        args.origin_rcvbuf,
    )
    return args, proxy


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
