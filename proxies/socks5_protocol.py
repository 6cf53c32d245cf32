"""SOCKS5 server-side protocol, without I/O.

Read first: RFC 1928 (SOCKS Protocol Version 5) sections 3, 4, 5 and 6, and
RFC 1929 (Username/Password Authentication for SOCKS V5).

Theory of operation
-------------------
A SOCKS5 server sees three client messages, in this order::

    greeting      VER=5 NMETHODS METHODS...                 (RFC 1928 s.3)
    [auth]        VER=1 ULEN UNAME PLEN PASSWD              (RFC 1929 s.2)
    request       VER=5 CMD RSV ATYP DST.ADDR DST.PORT      (RFC 1928 s.4)

Each ``parse_*`` function takes every byte received so far for that message
and returns ``NEED_MORE`` (keep reading), the parsed message (whose
``consumed`` says how many bytes it used; the rest belongs to the next
message), or a ``ProtocolError`` naming the reply code to send before closing
(``reply is None`` means no reply is possible, just close).

``Negotiation`` strings the three together for a proxy's I/O shell: feed it
bytes, act on the events it returns, and once it emits ``Connect`` build the
final reply with ``build_reply``. Both the copy-loop proxy and the spliced
proxy use it, so their wire behaviour is identical up to the data phase.
"""

from __future__ import annotations

import enum
import errno
import hmac
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

SOCKS_VERSION: Final = 0x05
AUTH_VERSION: Final = 0x01  # RFC 1929 s.2: sub-negotiation version

# Longest possible messages, so a shell can bound its read buffer.
MAX_GREETING_LEN: Final = 2 + 255
MAX_AUTH_LEN: Final = 3 + 255 + 255
MAX_REQUEST_LEN: Final = 4 + 1 + 255 + 2


class Method(enum.IntEnum):
    """Authentication methods, RFC 1928 s.3."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """Request commands, RFC 1928 s.4."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    """ATYP values, RFC 1928 s.5."""

    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    """REP field of a reply, RFC 1928 s.6."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class AuthStatus(enum.IntEnum):
    """STATUS of the RFC 1929 reply: zero is success, anything else failure."""

    SUCCESS = 0x00
    FAILURE = 0x01


class NeedMore(enum.Enum):
    """The message is incomplete: read more bytes and parse again."""

    NEED_MORE = "need more"


NEED_MORE: Final = NeedMore.NEED_MORE


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """Malformed or unsupported input; send ``reply`` (if any) and close."""

    reason: str
    reply: Reply | None = None


@dataclass(frozen=True, slots=True)
class Greeting:
    methods: tuple[int, ...]
    consumed: int


@dataclass(frozen=True, slots=True)
class Credentials:
    username: bytes
    password: bytes
    consumed: int = 0

    def matches(self, other: Credentials) -> bool:
        # Constant-time compare: a byte-by-byte early exit leaks the prefix length.
        user_ok = hmac.compare_digest(self.username, other.username)
        password_ok = hmac.compare_digest(self.password, other.password)
        return user_ok and password_ok


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    address_type: AddressType
    host: str  # dotted quad, IPv6 text, or the domain name as sent
    port: int
    consumed: int


def parse_greeting(data: bytes) -> Greeting | NeedMore | ProtocolError:
    """Version identifier/method selection message, RFC 1928 s.3."""
    if len(data) < 1:
        return NEED_MORE
    if data[0] != SOCKS_VERSION:
        # Not SOCKS5 (often SOCKS4 or HTTP): there is no reply format to use.
        return ProtocolError(f"greeting version {data[0]:#04x}, expected 0x05")
    if len(data) < 2:
        return NEED_MORE
    end = 2 + data[1]
    if len(data) < end:
        return NEED_MORE
    return Greeting(methods=tuple(data[2:end]), consumed=end)


def select_method(offered: tuple[int, ...], *, auth_required: bool) -> Method:
    """The one method the server accepts; NO_ACCEPTABLE means close after saying so."""
    # With credentials configured, no-auth must be refused (RFC 1928 s.3: the
    # server picks, and 0xFF tells the client none of its methods will do).
    wanted = Method.USERNAME_PASSWORD if auth_required else Method.NO_AUTH
    return wanted if wanted in offered else Method.NO_ACCEPTABLE


def parse_auth(data: bytes) -> Credentials | NeedMore | ProtocolError:
    """Username/password request, RFC 1929 s.2."""
    if len(data) < 1:
        return NEED_MORE
    if data[0] != AUTH_VERSION:
        return ProtocolError(f"auth version {data[0]:#04x}, expected 0x01")
    if len(data) < 2:
        return NEED_MORE
    user_end = 2 + data[1]
    if len(data) < user_end + 1:
        return NEED_MORE
    password_end = user_end + 1 + data[user_end]
    if len(data) < password_end:
        return NEED_MORE
    return Credentials(
        username=bytes(data[2:user_end]),
        password=bytes(data[user_end + 1 : password_end]),
        consumed=password_end,
    )


def parse_request(data: bytes) -> Request | NeedMore | ProtocolError:
    """SOCKS request, RFC 1928 s.4 (addressing s.5); only CONNECT is served."""
    if len(data) < 1:
        return NEED_MORE
    if data[0] != SOCKS_VERSION:
        return ProtocolError(f"request version {data[0]:#04x}", Reply.GENERAL_FAILURE)
    if len(data) < 4:
        return NEED_MORE
    # RSV (data[2]) is not checked: RFC 1928 only says it is reserved.
    atyp = data[3]
    if atyp == AddressType.IPV4:
        addr_end = 4 + 4
    elif atyp == AddressType.IPV6:
        addr_end = 4 + 16
    elif atyp == AddressType.DOMAINNAME:
        if len(data) < 5:
            return NEED_MORE
        addr_end = 5 + data[4]
    else:
        # The address length is unknown, so nothing after this byte can be parsed.
        return ProtocolError(f"address type {atyp:#04x}", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    end = addr_end + 2
    if len(data) < end:
        return NEED_MORE
    # The command is judged only once the whole request is in, so the shell
    # knows where it ends and can drain it before closing (no RST on unread data).
    if data[1] != Command.CONNECT:
        return ProtocolError(f"command {data[1]:#04x}", Reply.COMMAND_NOT_SUPPORTED)
    (port,) = struct.unpack_from("!H", data, addr_end)
    address_type = AddressType(atyp)
    if address_type is AddressType.IPV4:
        host = str(ipaddress.IPv4Address(bytes(data[4:8])))
    elif address_type is AddressType.IPV6:
        host = str(ipaddress.IPv6Address(bytes(data[4:20])))
    else:
        raw = bytes(data[5:addr_end])
        if not raw:
            return ProtocolError("empty domain name", Reply.HOST_UNREACHABLE)
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            # Internationalised names travel as IDNA "xn--" ASCII; raw UTF-8 cannot resolve.
            return ProtocolError("non-ASCII domain name", Reply.HOST_UNREACHABLE)
    return Request(Command.CONNECT, address_type, host, port, consumed=end)


def build_method_selection(method: Method) -> bytes:
    """METHOD selection message, RFC 1928 s.3."""
    return bytes((SOCKS_VERSION, method))


def build_auth_reply(status: AuthStatus) -> bytes:
    """RFC 1929 s.2 reply: VER STATUS."""
    return bytes((AUTH_VERSION, status))


def build_reply(reply: Reply, bound: tuple[str, int] | None = None) -> bytes:
    """Reply, RFC 1928 s.6. ``bound`` is the outgoing socket's address (BND.ADDR/PORT).

    Failure replies carry 0.0.0.0:0, as the fields are meaningless then.
    """
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes((SOCKS_VERSION, reply, 0x00, atyp)) + address.packed + struct.pack("!H", port)


_REPLY_FOR_ERRNO: Final[dict[int, Reply]] = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    # RFC 1928 has no "timed out" code; 0x06 "TTL expired" is what clients
    # (curl, dante) read as a connect timeout.
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
}


def reply_for_errno(number: int | None) -> Reply:
    """The reply code for a failed connect() with this errno."""
    if number is None:
        return Reply.GENERAL_FAILURE
    return _REPLY_FOR_ERRNO.get(number, Reply.GENERAL_FAILURE)


def reply_for_connect_error(exc: BaseException) -> Reply:
    """The reply code for an exception from resolving or connecting to DST."""
    if isinstance(exc, socket.gaierror):
        # gaierror's errno is an EAI_* code, not an errno: a name that does not
        # resolve is a host that cannot be reached.
        return Reply.HOST_UNREACHABLE
    if isinstance(exc, TimeoutError):  # socket.timeout from settimeout(), or ETIMEDOUT
        return Reply.TTL_EXPIRED
    if isinstance(exc, OSError):
        return reply_for_errno(exc.errno)
    return Reply.GENERAL_FAILURE


# --- Negotiation: the three messages in order ---------------------------------


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Write these bytes to the client and keep negotiating."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Reject:
    """Write ``data`` (maybe empty) to the client, then close the connection."""

    data: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Connect:
    """Negotiation is done: connect to ``request``, then send ``build_reply``.

    ``early_data`` is whatever the client sent after the request (optimistic
    data); it belongs to the destination.
    """

    request: Request
    early_data: bytes


Event = SendToClient | Reject | Connect


class Stage(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    DONE = "done"


@dataclass(slots=True)
class Negotiation:
    """SOCKS5 server negotiation for one client connection.

    ``credentials`` set means RFC 1929 username/password is required and
    no-auth is refused.
    """

    credentials: Credentials | None = None
    stage: Stage = Stage.GREETING
    _buffer: bytearray = field(default_factory=bytearray)

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns what to do, in order."""
        if self.stage is Stage.DONE:
            raise RuntimeError("negotiation is over; relay data instead")
        self._buffer += data
        events: list[Event] = []
        while self.stage is not Stage.DONE:
            event = self._step()
            if event is None:
                break
            events.append(event)
            if not isinstance(event, SendToClient):
                self.stage = Stage.DONE
        return events

    def _step(self) -> Event | None:
        buffer = bytes(self._buffer)
        if self.stage is Stage.GREETING:
            greeting = parse_greeting(buffer)
            if isinstance(greeting, NeedMore):
                return None
            if isinstance(greeting, ProtocolError):
                return Reject(b"", greeting.reason)
            del self._buffer[: greeting.consumed]
            method = select_method(greeting.methods, auth_required=self.credentials is not None)
            if method is Method.NO_ACCEPTABLE:
                return Reject(build_method_selection(method), "no acceptable method")
            self.stage = Stage.AUTH if method is Method.USERNAME_PASSWORD else Stage.REQUEST
            return SendToClient(build_method_selection(method))
        if self.stage is Stage.AUTH:
            offered = parse_auth(buffer)
            if isinstance(offered, NeedMore):
                return None
            if isinstance(offered, ProtocolError):
                return Reject(b"", offered.reason)
            del self._buffer[: offered.consumed]
            assert self.credentials is not None
            if not self.credentials.matches(offered):
                # RFC 1929 s.2: on failure the server MUST close the connection.
                return Reject(build_auth_reply(AuthStatus.FAILURE), "bad credentials")
            self.stage = Stage.REQUEST
            return SendToClient(build_auth_reply(AuthStatus.SUCCESS))
        request = parse_request(buffer)
        if isinstance(request, NeedMore):
            return None
        if isinstance(request, ProtocolError):
            data = b"" if request.reply is None else build_reply(request.reply)
            return Reject(data, request.reason)
        early = bytes(self._buffer[request.consumed :])
        self._buffer.clear()
        return Connect(request, early)
