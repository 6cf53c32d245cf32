"""A listening endpoint: turns SYNs into connections, and an accept queue.

RFCs to read first: RFC 9293 3.10.7.2 (LISTEN state: RST first, then ACK ->
reset, then SYN -> SYN-RECEIVED), 3.10.7.1 (segments for no connection get a
reset, ``reset_for_unknown``), RFC 6528 (ISN of each new connection).

The event loop keeps a flow table; a segment whose 4-tuple is unknown but
whose destination is a listener goes to ``TcpListener.on_segment``.  A SYN
returns a new SYN-RECEIVED ``TcpConnection`` the loop registers in its flow
table and drives like any other (its SYN-ACK comes from its poll_output).
Once its handshake completes it joins the accept queue, drained by
``accept()``.  Both queues are bounded: a SYN is dropped when either is
full, and a final ACK is dropped while the accept queue is full (the peer
retransmits it), as Linux does.  Replies that belong to no connection (RSTs)
come from ``poll_output()`` as (remote, segment) pairs.
"""

from __future__ import annotations

from collections import deque

from daemon.tcp.config import Endpoint, TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.isn import IsnGenerator
from daemon.tcp.reset import reset_for_unknown
from daemon.tcp.state import TcpState
from daemon.wire.tcp import ACK, RST, SYN, TcpSegment

__all__ = ["TcpListener", "reset_for_unknown"]


class TcpListener:
    __slots__ = ("_accept_queue", "_embryonic", "_out", "config", "isn", "local", "syn_drops")

    def __init__(self, config: TcpConfig, local: Endpoint, isn: IsnGenerator) -> None:
        self.config = config
        self.local = local
        self.isn = isn
        self._embryonic: dict[Endpoint, TcpConnection] = {}
        self._accept_queue: deque[TcpConnection] = deque()
        self._out: list[tuple[Endpoint, TcpSegment]] = []
        self.syn_drops = 0

    @property
    def state(self) -> TcpState:
        return TcpState.LISTEN

    def on_segment(self, remote: Endpoint, seg: TcpSegment, now: float) -> TcpConnection | None:
        """A segment from ``remote`` for no known connection (RFC 9293 3.10.7.2)."""
        child = self._embryonic.get(remote)
        if child is not None:
            # The loop should route by flow table; forward in case it did not.
            child.on_segment(seg, now)
            return None
        flags = seg.flags
        if flags & RST:
            return None  # "An incoming RST should be ignored."
        if flags & ACK:
            # "Any acknowledgment is bad if it arrives on a connection still
            # in the LISTEN state": <SEQ=SEG.ACK><CTL=RST>.
            rst = reset_for_unknown(seg)
            if rst is not None:
                self._out.append((remote, rst))
            return None
        if not flags & SYN:
            return None
        if (
            len(self._embryonic) >= self.config.syn_backlog
            or len(self._accept_queue) >= self.config.accept_backlog
        ):
            self.syn_drops += 1  # the peer retransmits its SYN later
            return None
        iss = self.isn.isn(self.local, remote, now)
        conn = TcpConnection.accept_syn(self.config, self.local, remote, seg, iss, now, self)
        self._embryonic[remote] = conn
        return conn

    def accept(self) -> TcpConnection | None:
        """The oldest established connection not yet accepted, or None."""
        return self._accept_queue.popleft() if self._accept_queue else None

    def pending(self) -> int:
        """Connections waiting in the accept queue."""
        return len(self._accept_queue)

    def poll_output(self) -> list[tuple[Endpoint, TcpSegment]]:
        """Resets to send, each with the remote endpoint it goes to."""
        out = self._out
        self._out = []
        return out

    # Called by child connections (connection.Parent protocol).

    def child_established(self, conn: TcpConnection) -> bool:
        if len(self._accept_queue) >= self.config.accept_backlog:
            return False
        self._embryonic.pop(conn.remote, None)
        self._accept_queue.append(conn)
        return True

    def child_closed(self, conn: TcpConnection) -> None:
        if self._embryonic.get(conn.remote) is conn:
            del self._embryonic[conn.remote]
