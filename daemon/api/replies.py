"""What both client libraries (threaded ``client``, asyncio ``aio``) share.

The errors a proxy sees and the checks on the daemon's reply fields, so the
two clients raise exactly the same things for the same replies.
"""

from __future__ import annotations

import base64
import errno
import socket

from daemon.api.protocol import MAX_LINE, Address

REPLY_LIMIT = 64 * MAX_LINE  # replies (list, stats) may be longer than requests
MAX_FDS_PER_RECV = 64
# One reply read at a time fits: 64 KiB stays below glibc's mmap threshold,
# so a read does not cost an mmap/munmap pair (a 256 KiB one did, per reply).
RECV_SIZE = 64 * 1024
DISCONNECTED = "EDISCONNECTED"  # client-side code: the API connection is gone


class SpliceError(Exception):
    """An error reply from the daemon.

    ``code`` is the protocol's stable code (see ``ErrorCode``); ``errno`` is
    the matching ``errno`` value where one exists (ECONNREFUSED, ETIMEDOUT,
    ...), so a proxy can answer its own client as a socket error would.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        value = getattr(errno, code, None)
        self.errno: int | None = value if isinstance(value, int) else None


class DaemonGone(SpliceError):
    """The API connection to the daemon is closed; nothing more can be asked."""

    def __init__(self, message: str) -> None:
        super().__init__(DISCONNECTED, message)


def reply_address(value: object) -> Address:
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        return (value[0], value[1])
    raise SpliceError("EPROTO", f"daemon sent a malformed address {value!r}")


def reply_id(reply: dict[str, object], name: str) -> int:
    value = reply.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise SpliceError("EPROTO", f"daemon reply lacks an integer {name!r}: {reply!r}")


def handed_conn(
    reply: dict[str, object], sock: socket.socket | None, *, need_sock: bool = True
) -> tuple[int, socket.socket | None, Address, Address]:
    """(conn id, socket, peer, local) of a reply that names a connection.

    The reply must come with its descriptor unless ``need_sock`` is false
    (a conn the daemon released); ``sock`` is closed if anything is wrong.
    """
    try:
        if need_sock and sock is None:
            raise SpliceError("EPROTO", f"reply without a descriptor: {reply!r}")
        peer, local = reply_address(reply.get("peer")), reply_address(reply.get("local"))
        return reply_id(reply, "conn"), sock, peer, local
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def error_from(reply: dict[str, object]) -> SpliceError:
    return SpliceError(str(reply.get("error")), str(reply.get("message", "")))


def connect_splice_args(
    client: int,
    remote: Address,
    length: int | None,
    local: Address | None,
    timeout: float,
    data: bytes | None,
    local_at: int | None,
) -> dict[str, object]:
    """The request fields of connect_splice, both clients alike (docs/api.md)."""
    args: dict[str, object] = {
        "client": client,
        "remote": list(remote),
        "local": None if local is None else list(local),
        "timeout": timeout,
    }
    if data is None:
        if length is None:
            raise ValueError("connect_splice needs len or data")
        args["len"] = length
    else:
        args["data"] = base64.b64encode(data).decode("ascii")
        args["local_at"] = local_at
    return args


def with_local(data: bytes, local_at: int, local: Address | None) -> bytes:
    """``data`` with the bound local address at ``local_at`` (connect_splice's ``local_at``).

    What the daemon does with an inline reply, for when the splice was left
    to the proxy: 4 address bytes and the port, network order (IPv4).
    """
    if local is None:
        raise SpliceError("EPROTO", "no local address to write into the reply")
    packed = socket.inet_aton(local[0]) + local[1].to_bytes(2, "big")
    return data[:local_at] + packed + data[local_at + len(packed) :]


def take_unread(sock: socket.socket | None) -> bytes:
    """Everything readable in ``sock`` right now, without blocking.

    (The bytes a proxy left unread in a client fd after intend_splice: they
    belong to the server and go back to the daemon with ``splice``.)
    """
    if sock is None:
        return b""
    out = bytearray()
    # Not MSG_DONTWAIT alone: a socket with a timeout would first wait for
    # readability in Python's own poll, for the whole timeout.
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        sock.settimeout(timeout)
    return bytes(out)
