"""The client side of SOCKS5: RFC 1928 CONNECT, with RFC 1929 username/password.

Read RFC 1928 sections 3-6 and RFC 1929 section 2 first. The exchange on a
connected socket is, in order:

    client                                   proxy
    VER=5 NMETHODS METHODS...       ->                       (RFC 1928 section 3)
                                    <-  VER=5 METHOD
    [VER=1 ULEN UNAME PLEN PASSWD   ->                       (RFC 1929 section 2)
                                    <-  VER=1 STATUS]
    VER=5 CMD=1 RSV ATYP ADDR PORT  ->                       (RFC 1928 section 4)
                                    <-  VER=5 REP RSV ATYP BND.ADDR BND.PORT   (section 6)

after which the socket carries the relayed stream. The builders and parsers
below do no I/O; :func:`socks5_connect` drives them over a blocking socket,
reading exactly the bytes each message has so no relayed data is consumed.

Errors: a non-zero REP raises :class:`Socks5Error` (``reply_code``); a proxy
that refuses every offered method or rejects the credentials raises
:class:`Socks5AuthError`; anything not shaped like RFC 1928 (wrong version,
unknown ATYP, EOF mid-message) raises :class:`Socks5ProtocolError`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

VERSION = 5
AUTH_VERSION = 1  # RFC 1929 section 2: the subnegotiation has its own version

METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# RFC 1928 section 6.
REPLY_MESSAGES = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}


class Socks5Error(Exception):
    """The proxy answered the CONNECT with a non-zero REP field."""

    def __init__(self, reply_code: int, message: str) -> None:
        super().__init__(f"SOCKS5 reply 0x{reply_code:02x}: {message}")
        self.reply_code = reply_code
        self.message = message


class Socks5AuthError(Exception):
    """No offered method was acceptable, or the username/password was rejected."""


class Socks5ProtocolError(Exception):
    """The proxy sent something that is not RFC 1928/1929."""


# --- messages (no I/O) --------------------------------------------------------


def greeting(with_password: bool) -> bytes:
    """The version/method-selection message (RFC 1928 section 3)."""
    methods = [METHOD_USERNAME_PASSWORD] if with_password else [METHOD_NO_AUTH]
    return bytes([VERSION, len(methods), *methods])


def parse_method_selection(message: bytes, with_password: bool) -> int:
    """The METHOD the proxy chose, checked against what we offered."""
    version, method = message
    if version != VERSION:
        raise Socks5ProtocolError(f"method selection has version {version}, expected 5")
    if method == METHOD_NONE_ACCEPTABLE:
        raise Socks5AuthError("the proxy accepts none of the offered authentication methods")
    offered = METHOD_USERNAME_PASSWORD if with_password else METHOD_NO_AUTH
    if method != offered:
        raise Socks5ProtocolError(f"the proxy chose method 0x{method:02x}, which was not offered")
    return method


def password_request(username: str, password: str) -> bytes:
    """The username/password request (RFC 1929 section 2): 1-255 bytes each."""
    user = username.encode()
    secret = password.encode()
    if not 1 <= len(user) <= 255 or not 1 <= len(secret) <= 255:
        raise ValueError("SOCKS5 username and password must each be 1-255 bytes")
    return bytes([AUTH_VERSION, len(user)]) + user + bytes([len(secret)]) + secret


def parse_password_status(message: bytes) -> None:
    version, status = message
    if version != AUTH_VERSION:
        raise Socks5ProtocolError(f"auth reply has version {version}, expected 1")
    # RFC 1929 section 2: any non-zero STATUS is a failure.
    if status != 0:
        raise Socks5AuthError(f"the proxy rejected the username/password (status {status})")


def connect_request(host: str, port: int) -> bytes:
    """CONNECT to an IPv4/IPv6 literal or, for anything else, a domain name (section 4-5)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"domain name {host!r} must be 1-255 bytes") from None
        destination = bytes([ATYP_DOMAIN, len(name)]) + name
    else:
        atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
        destination = bytes([atyp]) + address.packed
    return bytes([VERSION, CMD_CONNECT, 0]) + destination + struct.pack("!H", port)


def check_reply_status(prefix: bytes) -> None:
    """Check VER and REP, the first two reply bytes (section 6).

    Looked at before the rest of the reply is read: a failing proxy may close
    right after REP without sending a usable address.
    """
    version, reply = prefix
    if version != VERSION:
        raise Socks5ProtocolError(f"reply has version {version}, expected 5")
    if reply != 0:
        raise Socks5Error(reply, REPLY_MESSAGES.get(reply, "unassigned reply code"))


def reply_address_length(head: bytes) -> int:
    """How many bytes follow the 5-byte reply prefix VER REP RSV ATYP X.

    The fifth byte is the first address byte, or the length byte of a domain.
    """
    atyp, first = head[3], head[4]
    if atyp == ATYP_IPV4:
        return 4 - 1 + 2
    if atyp == ATYP_IPV6:
        return 16 - 1 + 2
    if atyp == ATYP_DOMAIN:
        return first + 2
    raise Socks5ProtocolError(f"reply has unknown address type 0x{atyp:02x}")


def parse_bound_address(reply: bytes) -> tuple[str, int]:
    """BND.ADDR and BND.PORT from a whole successful reply."""
    atyp = reply[3]
    (port,) = struct.unpack("!H", reply[-2:])
    if atyp == ATYP_DOMAIN:
        return reply[5:-2].decode("idna"), port
    return str(ipaddress.ip_address(reply[4:-2])), port


# --- the I/O shell --------------------------------------------------------------


def socks5_connect(
    sock: socket.socket,
    host: str,
    port: int,
    *,
    username: str | None = None,
    password: str | None = None,
) -> tuple[str, int]:
    """Ask the proxy at the other end of ``sock`` to CONNECT to ``host:port``.

    Returns the proxy's bound address. ``host`` that is not an IP literal is
    sent as a domain name for the proxy to resolve. Socket errors and timeouts
    propagate unchanged.
    """
    with_password = username is not None or password is not None
    sock.sendall(greeting(with_password))
    parse_method_selection(_recv_exactly(sock, 2, "method selection"), with_password)
    if with_password:
        sock.sendall(password_request(username or "", password or ""))
        parse_password_status(_recv_exactly(sock, 2, "authentication reply"))
    sock.sendall(connect_request(host, port))
    prefix = _recv_exactly(sock, 2, "CONNECT reply")
    check_reply_status(prefix)
    head = prefix + _recv_exactly(sock, 3, "CONNECT reply")
    rest = _recv_exactly(sock, reply_address_length(head), "CONNECT reply address")
    return parse_bound_address(head + rest)


def _recv_exactly(sock: socket.socket, count: int, what: str) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise Socks5ProtocolError(
                f"the proxy closed the connection after {len(data)} of {count} bytes of the {what}"
            )
        data += chunk
    return bytes(data)
