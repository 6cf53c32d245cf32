"""What the API server needs from the daemon core, and what it offers back.

The API server (daemon/api/server.py) speaks the wire protocol and tracks
which API client owns which object; everything about TCP is the core's.
The core implements ``Core``; the server implements ``ApiSink`` and the core
calls it when an object goes away or an event should reach a proxy.

Threading: every method on both sides runs in the daemon's event-loop
thread, and ``Done`` callbacks must be called from that thread too.  No
locks anywhere in the API layer rely on anything else.

Ownership is the server's job: by the time a ``Core`` method is called, the
server has checked that every conn / listener id in the request exists in
its table and belongs to ``owner``.  The core still validates *state*
(ESTATE) and may answer ENOENT for an id it freed but has not yet
``forget``-ed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Protocol

from daemon.api.protocol import Address, ErrorCode, Inline

# The key of a core result that holds a socket for the reply (not JSON).
TAP_SOCK = "_tap_sock"


class ApiError(Exception):
    """An op failed in a way the proxy should hear about, with a stable code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class ObjectKind(StrEnum):
    CONN = "conn"
    LISTENER = "listener"


Result = dict[str, object]

# Completion of an async op (accept, connect): the result or the error, and
# the proxy's end of the socketpair for a successful accept/connect (None
# otherwise).  The server takes ownership of the socket: it sends it to the
# proxy with SCM_RIGHTS and closes the daemon's copy.  Call it exactly once.
Done = Callable[[Result | ApiError, socket.socket | None], None]


class Core(Protocol):
    """The operations of thesis 4.1 as the daemon core offers them.

    Synchronous methods return the reply fields or raise ``ApiError``; any
    other exception is a core bug, answered with EINTERNAL and logged.
    Results that create an object name it: ``{"listener": id, "addr": [h, p]}``
    for listen, ``{"conn": id, "peer": [h, p], "local": [h, p]}`` for accept
    and connect, ``{"conn": id}`` for intend_splice.  Ids are unique per
    kind for the daemon's lifetime (never reused), so a stale id is ENOENT,
    never someone else's object.
    """

    def listen(self, owner: int, addr: Address, backlog: int) -> Result: ...

    def accept(self, owner: int, listener: int, done: Done) -> None: ...

    def connect(
        self,
        owner: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        conn: int | None,
        done: Done,
        rcvbuf: int | None = None,
    ) -> None:
        """Open a connection; ``conn`` is a server-side conn from intend_splice or None.

        ``rcvbuf``: this connection's receive buffering (window and fd), bytes.
        """

    def close(self, owner: int, conn: int) -> Result: ...

    def keepalive(self, owner: int, conn: int, params: tuple[float, float, int] | None) -> Result:
        """RFC 9293 3.8.4 keep-alive on the conn: (idle, interval, count) seconds/probes, or off.

        ESTATE for a spliced conn (its segments are the relay's).
        """

    def abort(self, owner: int, conn: int) -> Result:
        """RST the conn now and free it (RFC 9293 3.10.5): unsent and unread bytes are lost.

        ESTATE for a spliced conn: the relay owns its end (``close`` lets go).
        """

    def close_listener(self, owner: int, listener: int) -> Result: ...

    def shutdown(self, owner: int, conn: int) -> Result: ...

    def stats(self, owner: int, conn: int | None) -> Result:
        """Per-connection counters, or daemon-wide counters when ``conn`` is None."""

    def intend_splice(self, owner: int, conn: int, server: int | None = None) -> Result:
        """``server``: pair with this established conn instead of reserving one."""

    def splice(
        self,
        owner: int,
        client: int,
        server: int,
        length: int,
        unread: bytes = b"",
        limits: tuple[int, int] | None = None,
        server_unread: bytes = b"",
        tap: bool = False,
    ) -> Result:
        """``unread``: bytes the proxy found unread in the client fd after intend_splice.

        ``limits`` (toward the client, toward the server) bound the splice;
        ``server_unread`` is ``unread`` for the server fd of a paired intent.
        With ``tap`` the result holds the proxy's end of the tap's socket
        under ``TAP_SOCK`` (the server sends it with the reply).
        """

    def connect_splice(
        self,
        owner: int,
        client: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        length: int,
        done: Done,
        inline: Inline | None = None,
    ) -> None:
        """intend_splice(client) (or its pending intent), connect, then splice(len).

        ``done`` gets the connect result plus ``"spliced": bool``: false when
        the proxy had not read everything delivered on ``client`` (then it
        calls ``splice`` with those bytes itself).  On a connect error the
        intent stays, as after intend_splice + a failed connect.

        With ``inline`` and a splice, the core sends ``inline.data`` as the
        proxy's len bytes; with ``inline.release`` it then releases both
        conns (their ids are forgotten) and completes with ``"released":
        true`` and no socket.
        """

    def splice_sockets(self, owner: int, client: socket.socket, server: socket.socket) -> Result:
        """Take two kernel TCP connections over and splice them (daemon/io/repair.py).

        On success the connections are the daemon's and the sockets are closed
        without a sound (whoever closes the last descriptor); on an error
        they are as they were, the proxy's.
        """

    def client_gone(self, owner: int) -> None:
        """The API client disconnected.

        The core closes what it owned and had not spliced (FIN, or RST where
        received data was never read: RFC 9293 3.10.4 / RFC 2525 2.17),
        cancels its pending accepts/connects without calling their ``done``,
        and leaves spliced pairs flowing.  ``forget`` calls are not needed
        for ``owner``'s objects: the server has dropped them already.
        """


class ApiSink(Protocol):
    """What the API server offers the core."""

    def forget(self, kind: ObjectKind, object_id: int) -> None:
        """The object is freed; its id is no longer valid for any client."""

    def push_event(self, owner: int, event: Mapping[str, object]) -> None:
        """Queue ``{"event": name, ...}`` for ``owner``; dropped if it is gone."""
