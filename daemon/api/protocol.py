"""The wire protocol of the daemon's Unix socket API, with no I/O.

Theory of operation
-------------------
A proxy talks to the daemon over one Unix stream socket.  Both directions
carry newline-delimited JSON: one UTF-8 object per line, at most
``MAX_LINE`` bytes including the newline (docs/api.md is the reference a C or
Go author reads; this module is its executable form).

* A request is ``{"id": <int>, "op": "<name>", ...args}``.  ``parse_request``
  turns one line into a typed request object or, for anything malformed, a
  ``BadRequest`` value that already names the reply to send.  Nothing in this
  module raises on bad input: misuse is an error *value* at the edge, so the
  server can answer it and carry on.
* A reply is ``{"id": <same>, "ok": true, ...results}`` or
  ``{"id": <same or null>, "ok": false, "error": "<CODE>", "message": "..."}``.
  A reply that hands over a connection also carries ``"fd": true`` and one
  file descriptor travels with it (SCM_RIGHTS); that pairing is the server's
  business, this module only encodes the line.
* An unsolicited event has no id: ``{"event": "<name>", ...}``.

Unknown extra fields in a request are ignored, so a newer client can talk to
an older daemon; unknown ops are answered with ``EUNKNOWNOP``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024  # bytes per line, newline included
MAX_ID = 2**63 - 1  # ids fit a C int64_t / Go int64
DEFAULT_BACKLOG = 128
MAX_BACKLOG = 65535
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_CONNECT_TIMEOUT = 3600.0

Address = tuple[str, int]


class ErrorCode(StrEnum):
    """Stable error codes: part of the protocol, never renamed.

    Where a code shares a name with an errno value it means the same thing,
    so a proxy can map it to what its own socket layer would have reported
    (a SOCKS5 server, e.g., maps ECONNREFUSED to reply code 5).
    """

    EBADREQ = "EBADREQ"  # not JSON, not an object, a field missing or of the wrong type
    EUNKNOWNOP = "EUNKNOWNOP"  # the op is not (yet) implemented by this daemon
    EMSGSIZE = "EMSGSIZE"  # request line over MAX_LINE: the API connection is closed
    ENOENT = "ENOENT"  # no such conn / listener id
    EPERM = "EPERM"  # the id belongs to another API client
    ESTATE = "ESTATE"  # the op is not valid in the object's current state
    EADDRINUSE = "EADDRINUSE"
    EADDRNOTAVAIL = "EADDRNOTAVAIL"  # a local address the daemon does not own
    ECONNREFUSED = "ECONNREFUSED"  # the peer answered the SYN with RST
    EHOSTUNREACH = "EHOSTUNREACH"
    ENETUNREACH = "ENETUNREACH"
    ETIMEDOUT = "ETIMEDOUT"  # no SYN-ACK within the connect timeout
    ECONNRESET = "ECONNRESET"  # the connection was reset before the op completed
    ECANCELED = "ECANCELED"  # the object the op waited on was closed meanwhile
    ELIMIT = "ELIMIT"  # a daemon limit (clients, connections, pending ops) was hit
    EOPNOTSUPP = "EOPNOTSUPP"  # this daemon cannot do the op here (splice_sockets: no fast path)
    EINTERNAL = "EINTERNAL"  # a daemon bug; it was logged and the daemon carries on


# ---------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class Hello:
    id: int
    version: int


@dataclass(frozen=True, slots=True)
class Listen:
    """init_splice (thesis 4.1): a listening endpoint whose connections can be spliced."""

    id: int
    addr: Address
    backlog: int


@dataclass(frozen=True, slots=True)
class Accept:
    id: int
    listener: int


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a connection; ``conn`` names a server-side conn made by intend_splice."""

    id: int
    remote: Address
    local: Address | None
    timeout: float
    conn: int | None
    # Receive buffering for this connection (TCP window and the fd's queue):
    # small for a conn whose data the proxy will mostly splice, so that the
    # data waits at the peer, not in the daemon (None: the daemon's default).
    rcvbuf: int | None = None


@dataclass(frozen=True, slots=True)
class Close:
    id: int
    conn: int


@dataclass(frozen=True, slots=True)
class Keepalive:
    """RFC 9293 3.8.4 keep-alive for one conn: (idle, interval, count), or None for off."""

    id: int
    conn: int
    params: tuple[float, float, int] | None


@dataclass(frozen=True, slots=True)
class Abort:
    """RST now (RFC 9293 3.10.5 ABORT): what is unsent or unread is discarded."""

    id: int
    conn: int


@dataclass(frozen=True, slots=True)
class CloseListener:
    id: int
    listener: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Close our sending side: FIN after the data already written (RFC 9293 3.10.4)."""

    id: int
    conn: int


@dataclass(frozen=True, slots=True)
class Stats:
    id: int
    conn: int | None


@dataclass(frozen=True, slots=True)
class ListObjects:
    id: int


@dataclass(frozen=True, slots=True)
class IntendSplice:
    """intend_splice (thesis 4.1): client reads stop; a server-side conn is reserved."""

    id: int
    conn: int
    # Beyond the thesis: pair with this established conn of the proxy's
    # instead of reserving a new server side (a bounded splice's pair).
    server: int | None = None


@dataclass(frozen=True, slots=True)
class Splice:
    """splice (thesis 4.1): after it, only ``length`` more bytes may go to ``client``."""

    id: int
    client: int
    server: int
    length: int
    # Bytes the proxy found unread in the client fd after intend_splice: they
    # were delivered before reading stopped and belong to the server now.
    unread: bytes = b""
    # A bounded splice: (bytes of the server's stream toward the client, of
    # the client's toward the server), then the hand-back; None: unbounded.
    limits: tuple[int, int] | None = None
    # The same for the server fd of a paired intend_splice: server bytes the
    # proxy read but did not consume; they go to the client first.
    server_unread: bytes = b""
    # A TCP tap (thesis 4.4) of the server's stream: the reply carries its fd.
    tap: bool = False


@dataclass(frozen=True, slots=True)
class ConnectSplice:
    """intend_splice + connect + splice(len) in one request (an optimisation, docs/api.md).

    The thesis's three ops stay; this one saves a proxy that knows its reply
    length two round trips.  The splice happens only if the proxy has read
    everything delivered on ``client``; otherwise the reply says
    ``"spliced": false`` and the proxy calls ``splice`` itself.
    """

    id: int
    client: int
    remote: Address
    local: Address | None
    timeout: float
    length: int
    inline: Inline | None = None


@dataclass(frozen=True, slots=True)
class SpliceSockets:
    """Splice two of the proxy's own kernel TCP connections (passed with SCM_RIGHTS).

    The thesis's splice on kernel sockets: the proxy accepted the client and
    connected to the server itself, spoke its protocol, wrote its reply, and
    hands both connections over as they stand (daemon/io/repair.py).  Two
    descriptors travel with the request line: the client's, then the
    server's.  No ``len``: what the proxy wrote is in the sockets already.
    """

    id: int


# In an inline reply, the bound local address is written as SOCKS5 puts it
# (RFC 1928 s.6 BND.ADDR + BND.PORT): 4 address bytes and a 2-byte port, in
# network order (an IPv6 address would take 16 + 2).
LOCAL_AT_LEN = 6


@dataclass(frozen=True, slots=True)
class Inline:
    """connect_splice's ``len`` bytes carried in the request (docs/api.md).

    ``data`` goes to the client as soon as the pair is spliced, as if the
    proxy had written it to the client fd; ``local_at`` is where the daemon
    writes the server side's local address into it first (the SOCKS5 reply's
    BND fields); ``release`` asks the daemon to let go of both conns right
    after, as if the proxy had closed them (the reply then has no fd).
    """

    data: bytes
    local_at: int | None = None
    release: bool = False


Request = (
    Hello
    | Listen
    | Accept
    | Connect
    | Close
    | Abort
    | Keepalive
    | CloseListener
    | Shutdown
    | Stats
    | ListObjects
    | IntendSplice
    | Splice
    | ConnectSplice
    | SpliceSockets
)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A line that is not a valid request; ``id`` is None when it could not be read."""

    id: int | None
    code: ErrorCode
    message: str


class _Invalid(Exception):
    """Internal: a field failed validation.  Never escapes ``parse_request``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON (RFC 8259 section 6); Python accepts them by default.
    raise ValueError(f"{name} is not valid JSON")


def _field(obj: Mapping[str, object], name: str) -> object:
    if name not in obj:
        raise _Invalid(ErrorCode.EBADREQ, f"missing field {name!r}")
    return obj[name]


def _int(value: object, name: str, lo: int, hi: int) -> int:
    # bool is an int subclass in Python, but true/false is not a number in JSON.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(ErrorCode.EBADREQ, f"{name!r} must be an integer")
    if not lo <= value <= hi:
        raise _Invalid(ErrorCode.EBADREQ, f"{name!r} must be in {lo}..{hi}")
    return value


def _object_id(obj: Mapping[str, object], name: str) -> int:
    return _int(_field(obj, name), name, 0, MAX_ID)


def _optional_object_id(obj: Mapping[str, object], name: str) -> int | None:
    value = obj.get(name)
    return None if value is None else _int(value, name, 0, MAX_ID)


def parse_address(value: object, name: str = "addr", *, allow_port_zero: bool = True) -> Address:
    """Validate ``[host, port]``: an IPv4 dotted quad or IPv6 text, and a port.

    The host comes back in canonical text form (RFC 5952 for IPv6) so ids,
    logs and comparisons see one spelling.  Names are refused: the daemon
    does no DNS, the proxy resolves.
    """
    if not isinstance(value, list) or len(value) != 2:
        raise _Invalid(ErrorCode.EBADREQ, f"{name!r} must be [host, port]")
    host, port = value
    if not isinstance(host, str):
        raise _Invalid(ErrorCode.EBADREQ, f"{name!r} host must be a string")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(
            ErrorCode.EBADREQ, f"{name!r} host {host!r} is not an IPv4 or IPv6 address"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise _Invalid(ErrorCode.EBADREQ, f"{name!r} host must not carry a scope id")
    _int(port, f"{name} port", 0 if allow_port_zero else 1, 65535)
    assert isinstance(port, int)
    return (ip.compressed, port)


def _timeout(value: object) -> float:
    if value is None:
        return DEFAULT_CONNECT_TIMEOUT
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Invalid(ErrorCode.EBADREQ, "'timeout' must be a number of seconds")
    if not (0 < value <= MAX_CONNECT_TIMEOUT) or not math.isfinite(value):
        raise _Invalid(ErrorCode.EBADREQ, f"'timeout' must be in (0, {MAX_CONNECT_TIMEOUT:g}]")
    return float(value)


def _parse_hello(rid: int, obj: Mapping[str, object]) -> Request:
    return Hello(rid, _int(_field(obj, "version"), "version", 1, 2**31 - 1))


def _parse_listen(rid: int, obj: Mapping[str, object]) -> Request:
    backlog = obj.get("backlog")
    return Listen(
        rid,
        parse_address(_field(obj, "addr"), "addr"),
        DEFAULT_BACKLOG if backlog is None else _int(backlog, "backlog", 1, MAX_BACKLOG),
    )


def _parse_accept(rid: int, obj: Mapping[str, object]) -> Request:
    return Accept(rid, _object_id(obj, "listener"))


def _parse_connect(rid: int, obj: Mapping[str, object]) -> Request:
    local = obj.get("local")
    return Connect(
        rid,
        # Port 0 is not a destination (RFC 9293 3.1 reserves no meaning for it; stacks refuse).
        parse_address(_field(obj, "remote"), "remote", allow_port_zero=False),
        None if local is None else parse_address(local, "local"),
        _timeout(obj.get("timeout")),
        _optional_object_id(obj, "conn"),
        None if obj.get("rcvbuf") is None else _int(obj["rcvbuf"], "rcvbuf", 4096, 16 << 20),
    )


def _parse_close(rid: int, obj: Mapping[str, object]) -> Request:
    conn = _optional_object_id(obj, "conn")
    listener = _optional_object_id(obj, "listener")
    if (conn is None) == (listener is None):
        raise _Invalid(ErrorCode.EBADREQ, "'close' takes exactly one of 'conn' or 'listener'")
    if conn is not None:
        return Close(rid, conn)
    assert listener is not None
    return CloseListener(rid, listener)


def _parse_abort(rid: int, obj: Mapping[str, object]) -> Request:
    return Abort(rid, _object_id(obj, "conn"))


# RFC 1122 4.2.3.6 defaults, as Linux's: 2 h idle, then 9 probes 75 s apart.
KEEPALIVE_INTERVAL = 75.0
KEEPALIVE_COUNT = 9
KEEPALIVE_MAX = 86400.0


def _seconds(obj: Mapping[str, object], name: str, default: float) -> float:
    value = obj.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Invalid(ErrorCode.EBADREQ, f"'{name}' must be a number of seconds")
    if not (0 < value <= KEEPALIVE_MAX) or not math.isfinite(value):
        raise _Invalid(ErrorCode.EBADREQ, f"'{name}' must be in (0, {KEEPALIVE_MAX:g}]")
    return float(value)


def _parse_keepalive(rid: int, obj: Mapping[str, object]) -> Request:
    conn = _object_id(obj, "conn")
    if obj.get("idle") is None:
        return Keepalive(rid, conn, None)  # off
    idle = _seconds(obj, "idle", 0.0)
    interval = _seconds(obj, "interval", KEEPALIVE_INTERVAL)
    count = _int(obj.get("count", KEEPALIVE_COUNT), "count", 1, 255)
    return Keepalive(rid, conn, (idle, interval, count))


def _parse_shutdown(rid: int, obj: Mapping[str, object]) -> Request:
    return Shutdown(rid, _object_id(obj, "conn"))


def _parse_stats(rid: int, obj: Mapping[str, object]) -> Request:
    return Stats(rid, _optional_object_id(obj, "conn"))


def _parse_list(rid: int, obj: Mapping[str, object]) -> Request:
    return ListObjects(rid)


def _parse_intend_splice(rid: int, obj: Mapping[str, object]) -> Request:
    conn = _object_id(obj, "conn")
    server = _optional_object_id(obj, "server")
    if server == conn:
        raise _Invalid(ErrorCode.EBADREQ, "'conn' and 'server' must be different conns")
    return IntendSplice(rid, conn, server)


def _parse_splice(rid: int, obj: Mapping[str, object]) -> Request:
    client = _object_id(obj, "client")
    server = _object_id(obj, "server")
    if client == server:
        raise _Invalid(ErrorCode.EBADREQ, "'client' and 'server' must be different conns")
    # len counts bytes still to be written to the client fd; TCP sequence space is 2**32.
    length = _int(_field(obj, "len"), "len", 0, 2**31 - 1)
    limits = None
    server_limit, client_limit = obj.get("server_limit"), obj.get("client_limit")
    if server_limit is not None or client_limit is not None:
        # A bounded splice: both directions end (a missing limit is 0), or
        # there could be no hand-back.  Each must fit TCP's sequence space.
        limits = (
            0 if server_limit is None else _int(server_limit, "server_limit", 0, 2**31 - 1),
            0 if client_limit is None else _int(client_limit, "client_limit", 0, 2**31 - 1),
        )
    tap = obj.get("tap")
    if tap not in (None, "server"):
        raise _Invalid(ErrorCode.EBADREQ, "'tap' must be \"server\" (the server's stream)")
    return Splice(
        rid,
        client,
        server,
        length,
        _base64(obj, "unread") or b"",
        limits,
        _base64(obj, "server_unread") or b"",
        tap == "server",
    )


def _base64(obj: Mapping[str, object], name: str) -> bytes | None:
    raw = obj.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise _Invalid(ErrorCode.EBADREQ, f"{name!r} must be a base64 string")
    try:
        return base64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error):
        raise _Invalid(ErrorCode.EBADREQ, f"{name!r} is not valid base64") from None


def _parse_inline(obj: Mapping[str, object]) -> Inline | None:
    data = _base64(obj, "data")
    local_at = obj.get("local_at")
    release = obj.get("release", False)
    if not isinstance(release, bool):
        raise _Invalid(ErrorCode.EBADREQ, "'release' must be true or false")
    if data is None:
        if local_at is not None or release:
            raise _Invalid(ErrorCode.EBADREQ, "'local_at' and 'release' need 'data'")
        return None
    if local_at is not None:
        if len(data) < LOCAL_AT_LEN:
            raise _Invalid(ErrorCode.EBADREQ, f"'local_at' needs {LOCAL_AT_LEN}+ bytes of 'data'")
        local_at = _int(local_at, "local_at", 0, len(data) - LOCAL_AT_LEN)
    return Inline(data, local_at, release)


def _parse_connect_splice(rid: int, obj: Mapping[str, object]) -> Request:
    local = obj.get("local")
    inline = _parse_inline(obj)
    if inline is None or "len" in obj:
        length = _int(_field(obj, "len"), "len", 0, 2**31 - 1)
        if inline is not None and length != len(inline.data):
            raise _Invalid(ErrorCode.EBADREQ, "'len' must be the length of 'data'")
    else:
        length = len(inline.data)
    return ConnectSplice(
        rid,
        _object_id(obj, "client"),
        parse_address(_field(obj, "remote"), "remote", allow_port_zero=False),
        None if local is None else parse_address(local, "local"),
        _timeout(obj.get("timeout")),
        length,
        inline,
    )


def _parse_splice_sockets(rid: int, obj: Mapping[str, object]) -> Request:
    return SpliceSockets(rid)


_PARSERS = {
    "hello": _parse_hello,
    "listen": _parse_listen,
    "accept": _parse_accept,
    "connect": _parse_connect,
    "close": _parse_close,
    "abort": _parse_abort,
    "keepalive": _parse_keepalive,
    "shutdown": _parse_shutdown,
    "stats": _parse_stats,
    "list": _parse_list,
    "intend_splice": _parse_intend_splice,
    "splice": _parse_splice,
    "connect_splice": _parse_connect_splice,
    "splice_sockets": _parse_splice_sockets,
}

OPS: tuple[str, ...] = tuple(_PARSERS)


def parse_request(line: bytes) -> Request | BadRequest:
    """Parse one request line (with or without its trailing newline)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadRequest(None, ErrorCode.EBADREQ, "request is not valid UTF-8")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        return BadRequest(None, ErrorCode.EBADREQ, f"request is not valid JSON: {exc}")
    except RecursionError:
        return BadRequest(None, ErrorCode.EBADREQ, "request nests too deeply")
    if not isinstance(obj, dict):
        return BadRequest(None, ErrorCode.EBADREQ, "request must be a JSON object")
    try:
        rid = _object_id(obj, "id")
    except _Invalid as exc:
        return BadRequest(None, exc.code, exc.message)
    op = obj.get("op")
    if not isinstance(op, str):
        return BadRequest(rid, ErrorCode.EBADREQ, "'op' must be a string")
    parser = _PARSERS.get(op)
    if parser is None:
        return BadRequest(rid, ErrorCode.EUNKNOWNOP, f"unknown op {op!r}")
    try:
        return parser(rid, obj)
    except _Invalid as exc:
        return BadRequest(rid, exc.code, f"{op}: {exc.message}")


# ---------------------------------------------------------------------------
# Replies and events


def _encode(obj: Mapping[str, object]) -> bytes:
    # Compact separators and ASCII-only output: one line, easy to read from C.
    line = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return line.encode("ascii") + b"\n"


def encode_reply(rid: int, result: Mapping[str, object], *, fd: bool = False) -> bytes:
    """A success reply; ``fd=True`` marks the one that carries a descriptor."""
    body: dict[str, object] = {"id": rid, "ok": True}
    body.update((k, v) for k, v in result.items() if k not in ("id", "ok", "fd"))
    if fd:
        body["fd"] = True
    return _encode(body)


def encode_error(rid: int | None, code: ErrorCode, message: str) -> bytes:
    return _encode({"id": rid, "ok": False, "error": code.value, "message": message})


def encode_event(name: str, fields: Mapping[str, object]) -> bytes:
    body: dict[str, object] = {"event": name}
    body.update((k, v) for k, v in fields.items() if k != "event")
    return _encode(body)


# ---------------------------------------------------------------------------
# Framing


class LineFramer:
    """Split a byte stream into lines of at most ``limit`` bytes (newline included).

    ``feed`` returns the complete lines (without the newline).  Once a line
    grows past the limit the framer sets ``overflowed`` and swallows all
    further input: the protocol has no way to resynchronise inside an
    over-long line, so the caller closes the connection.
    """

    __slots__ = ("_buf", "limit", "overflowed")

    def __init__(self, limit: int = MAX_LINE) -> None:
        if limit < 2:
            raise ValueError("limit must leave room for one byte and the newline")
        self.limit = limit
        self.overflowed = False
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self.overflowed:
            return []
        lines: list[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if len(self._buf) + (nl - start) + 1 > self.limit:
                self._overflow()
                return lines
            if self._buf:
                self._buf += data[start:nl]
                lines.append(bytes(self._buf))
                self._buf.clear()
            else:
                lines.append(data[start:nl])
            start = nl + 1
        # The tail cannot end in a newline, so it must leave room for one.
        if len(self._buf) + (len(data) - start) + 1 > self.limit:
            self._overflow()
            return lines
        self._buf += data[start:]
        return lines

    def _overflow(self) -> None:
        self.overflowed = True
        self._buf.clear()
