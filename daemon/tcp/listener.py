"""A listening endpoint: turns SYNs into connections, and an accept queue.

RFCs to read first: RFC 9293 3.10.7.2 (LISTEN state: RST first, then ACK ->
reset, then SYN -> SYN-RECEIVED), 3.10.7.1 (segments for no connection get a
reset, ``reset_for_unknown``), RFC 6528 (ISN of each new connection).

The event loop keeps a flow table; a segment whose 4-tuple is unknown but
whose destination is a listener goes to ``TcpListener.on_segment``.  A SYN
returns a new SYN-RECEIVED ``TcpConnection`` the loop registers in its flow
table and drives like any other (its SYN-ACK comes from its poll_output).
Once its handshake completes it joins the accept queue, drained by
``accept()``.  Both queues are bounded.  A SYN is dropped while the accept
queue is full, and a final ACK is dropped while the accept queue is full
(the peer retransmits it), as Linux does.  While the SYN-RECEIVED queue is
full (a SYN flood, RFC 4987) a SYN gets a *SYN cookie* instead
(daemon/tcp/syncookie.py): a SYN-ACK that keeps no state here, whose ACK
rebuilds the connection; with ``TcpConfig.syn_cookies`` off it is dropped.
Replies that belong to no connection (RSTs, cookie SYN-ACKs) come from
``poll_output()`` as (remote, segment) pairs.
"""

from __future__ import annotations

from collections import deque

from daemon.tcp.config import Endpoint, TcpConfig
from daemon.tcp.connection import DEFAULT_MSS, TcpConnection, ts_clock
from daemon.tcp.isn import IsnGenerator
from daemon.tcp.reset import reset_for_unknown
from daemon.tcp.seq import MASK, seq_gt
from daemon.tcp.state import TcpState
from daemon.tcp.syncookie import (
    PERIOD,
    TS_BITS_MASK,
    SynCookies,
    decode_ts_bits,
    ts_bits,
)
from daemon.wire.tcp import ACK, FIN, RST, SYN, TcpOptions, TcpSegment

__all__ = ["TcpListener", "reset_for_unknown"]


class TcpListener:
    __slots__ = (
        "_accept_queue",
        "_cookie_until",
        "_cookies",
        "_embryonic",
        "_out",
        "config",
        "cookies_accepted",
        "cookies_sent",
        "isn",
        "local",
        "syn_drops",
    )

    def __init__(self, config: TcpConfig, local: Endpoint, isn: IsnGenerator) -> None:
        self.config = config
        self.local = local
        self.isn = isn
        self._embryonic: dict[Endpoint, TcpConnection] = {}
        self._accept_queue: deque[TcpConnection] = deque()
        self._out: list[tuple[Endpoint, TcpSegment]] = []
        self._cookies = SynCookies()
        # Cookie ACKs are only looked at while cookies may be out there: a
        # listener that never overflowed gives a blind attacker nothing to
        # guess (Linux: tcp_synq_no_recent_overflow).
        self._cookie_until = float("-inf")
        self.syn_drops = 0
        self.cookies_sent = 0
        self.cookies_accepted = 0

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
            if not flags & SYN and now < self._cookie_until:
                if len(self._accept_queue) >= self.config.accept_backlog:
                    return None  # as for a final ACK: the peer retransmits it
                child = self._from_cookie(remote, seg, now)
                if child is not None:
                    return child
            # "Any acknowledgment is bad if it arrives on a connection still
            # in the LISTEN state": <SEQ=SEG.ACK><CTL=RST>.
            rst = reset_for_unknown(seg)
            if rst is not None:
                self._out.append((remote, rst))
            return None
        if not flags & SYN:
            return None
        if len(self._accept_queue) >= self.config.accept_backlog:
            self.syn_drops += 1  # the peer retransmits its SYN later
            return None
        if len(self._embryonic) >= self.config.syn_backlog:
            if self.config.syn_cookies:
                self._send_cookie(remote, seg, now)
            else:
                self.syn_drops += 1
            return None
        iss = self.isn.isn(self.local, remote, now)
        conn = TcpConnection.accept_syn(self.config, self.local, remote, seg, iss, now, self)
        self._embryonic[remote] = conn
        return conn

    def _send_cookie(self, remote: Endpoint, syn: TcpSegment, now: float) -> None:
        """Answer ``syn`` with a SYN cookie and keep nothing (RFC 4987 3.6)."""
        c = self.config
        o = syn.options
        iss = self._cookies.make(self.local, remote, syn.seq, o.mss or DEFAULT_MSS, now)
        opts = TcpOptions(mss=c.mss)
        if c.timestamps and o.timestamp is not None:
            # The options a stateless server would forget ride in our TSval
            # (syncookie.py); as in _syn_segment, only those the peer offered.
            wscale = o.wscale if c.rcv_wscale is not None else None
            sack = c.sack and o.sack_permitted
            if wscale is not None:
                opts.wscale = c.rcv_wscale
            opts.sack_permitted = sack
            clock = ts_clock(self.local[0], remote[0], now)
            tsval = (clock & ~TS_BITS_MASK & MASK) | ts_bits(wscale, sack)
            if seq_gt(tsval, clock):
                # Never ahead of the clock the connection will send with, or
                # the peer's PAWS (RFC 7323 5) drops our next segments.
                tsval = (tsval - (TS_BITS_MASK + 1)) & MASK
            opts.timestamp = (tsval, o.timestamp[0])
        # Without timestamps: neither scaling nor SACK, which both sides then
        # go without (RFC 7323 2.2, RFC 2018 2).
        window = min(c.rcv_buf, 0xFFFF)  # RFC 7323 2.2: unscaled in a SYN
        ack = (syn.seq + 1) & MASK
        self._out.append(
            (remote, TcpSegment(self.local[1], remote[1], iss, ack, SYN | ACK, window, opts))
        )
        self.cookies_sent += 1
        self._cookie_until = now + 2 * PERIOD

    def _from_cookie(self, remote: Endpoint, seg: TcpSegment, now: float) -> TcpConnection | None:
        """The connection a valid cookie's ACK stands for, established; None if not one."""
        if seg.flags & (RST | FIN):
            return None
        client_isn = (seg.seq - 1) & MASK
        iss = (seg.ack - 1) & MASK
        mss = self._cookies.check(self.local, remote, client_isn, iss, now)
        if mss is None:
            return None
        o = seg.options
        wscale: int | None = None
        sack = False
        timestamp: tuple[int, int] | None = None
        if self.config.timestamps and o.timestamp is not None:
            wscale, sack = decode_ts_bits(o.timestamp[1])
            timestamp = (o.timestamp[0], 0)
        syn = TcpSegment(
            remote[1],
            self.local[1],
            client_isn,
            0,
            SYN,
            seg.window,
            TcpOptions(mss=mss, wscale=wscale, sack_permitted=sack, timestamp=timestamp),
        )
        conn = TcpConnection.accept_syn(self.config, self.local, remote, syn, iss, now, self)
        conn.syn_ack_sent_as_cookie(now)
        conn.on_segment(seg, now)
        if conn.state is not TcpState.ESTABLISHED:
            return None
        self.cookies_accepted += 1
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
