"""One TCP connection: the TCB and the RFC 9293 state machine, without I/O.

RFCs to read first, in this order: RFC 9293 3.3 (TCB variables and the state
diagram), 3.10.7 (segment arrival, whose step order ``on_segment`` follows),
3.8.6 (windows); RFC 5961 (challenge ACKs, blind RST/SYN/data); RFC 7323
(window scale, timestamps, PAWS); RFC 6298 (RTO); RFC 5681 + RFC 6582
(congestion control); RFC 1122 4.2.3.2 (delayed ACK), 4.2.3.3-4 (SWS
avoidance), 4.2.2.17 (zero-window probing), 4.2.2.13 (RST on close with
unread data); RFC 2018 (SACK blocks we advertise).

Theory of operation
-------------------
The event loop drives a connection through four calls and reads two fields::

    conn.on_segment(seg, now)      # a segment of this 4-tuple arrived
    conn.on_timer(now)             # when now >= conn.next_deadline()
    segs = conn.poll_output(now)   # after either of the above, or after send()
    conn.events                    # deque of TcpEvent, drained by the loop
    conn.state                     # TcpState

The application side is ``send`` / ``recv`` / ``shutdown_write`` / ``close``
/ ``abort``; they only change state, and the next ``poll_output`` emits what
they caused.  Nothing here reads a clock: every call that needs the time
takes ``now`` (float seconds, monotonic).

Segments are not bounded by the MSS.  A received segment may carry a 64 KB
GSO super-packet; it is one segment here.  Emitted data segments carry up to
``config.max_tso_bytes`` of payload, cut at a multiple of ``snd_mss`` so the
I/O layer can hand them to the kernel with gso_size = ``snd_mss``.

Sequence bookkeeping (RFC 9293 3.3.1), send side::

        snd_una         snd_nxt        snd_max       send_buf end (+FIN)
    ------|---------------|---------------|-----------------|
          <- sent, unacked (retransmit) -> <- not sent yet -->

``send_buf.seq`` is the sequence number of the first byte the buffer holds:
ISS+1 until the SYN is acked, SND.UNA after.  ``snd_max`` is the highest
sequence number sent; ``snd_nxt`` drops back to ``snd_una`` after an RTO
(go-back-N, as BSD does), so an ACK is acceptable up to ``snd_max``.  Our FIN
takes the sequence number ``fin_seq`` just after the last data byte.

Receive side: ``rcv_nxt`` is the next byte expected; ``rcv_adv`` the right
edge of the window we last advertised, which never moves left (RFC 9293
3.8.6.2.2).  In-order bytes go to ``recv_buf``, others to ``ooo`` (the
reassembly queue) until the gap fills.

Loss recovery: with SACK, RFC 6675 (daemon/tcp/sack.py keeps the
scoreboard): an ACK that SACKs new data is a duplicate ACK, recovery starts
at the third or when the first hole counts as lost, and while it lasts what
is sent is governed by ``pipe``: lost holes first, then new data, then the
other holes below the highest SACK, never a SACKed byte (until an RTO
clears the scoreboard, RFC 2018 8).  Without SACK, NewReno (RFC 6582).

Limited Transmit (RFC 3042) lets the first two duplicate ACKs send new
data, with or without SACK.  With SACK, two parts of RACK-TLP (RFC 8985):
a tail loss probe 2 SRTT after data or an ACK last moved (7: the ACKs of a
whole small flight lost no longer cost an RTO), and a retransmission is
lost once data sent after it is SACKed (6.2's rule, by send order).

Known simplifications: no rescue retransmission (RFC 6675 NextSeg rule 4,
a MAY), no time-based RACK loss detection (reordering window); no urgent
data (the
URG pointer is ignored, RFC 6093); classic ECN only (RFC 3168: ECT(0) on
new data, ECE until CWR; no AccECN, RFC 9768); challenge ACKs are rate
limited per connection, not per host (RFC 5961 7; ``TcpConfig``
explains why); zero-window probes are zero-length segments with
SEQ=SND.UNA-1, which every stack must answer with an ACK (RFC 9293 3.10.7.4
"not acceptable ... send an acknowledgment"), as Linux does.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from daemon.tcp.buffers import RecvBuffer, SendBuffer
from daemon.tcp.config import Endpoint, TcpConfig
from daemon.tcp.congestion import NewReno
from daemon.tcp.events import TcpEvent
from daemon.tcp.reassembly import ReassemblyQueue
from daemon.tcp.reset import reset_for_unknown
from daemon.tcp.rto import RtoEstimator
from daemon.tcp.sack import DUP_THRESH, Scoreboard
from daemon.tcp.seq import MASK, seq_ge, seq_gt, seq_in_window, seq_le, seq_lt, seq_sub
from daemon.tcp.state import TcpState
from daemon.wire.icmp import MIN_IPV6_MTU
from daemon.wire.ipv4 import ECN_CE, ECN_ECT0
from daemon.wire.tcp import ACK, CWR, ECE, FIN, PSH, RST, SYN, TcpOptions, TcpSegment

if TYPE_CHECKING:
    from daemon.tcp.kernel_state import KernelTcpState

CLOSED = TcpState.CLOSED
SYN_SENT = TcpState.SYN_SENT
SYN_RECEIVED = TcpState.SYN_RECEIVED
ESTABLISHED = TcpState.ESTABLISHED
FIN_WAIT_1 = TcpState.FIN_WAIT_1
FIN_WAIT_2 = TcpState.FIN_WAIT_2
CLOSE_WAIT = TcpState.CLOSE_WAIT
CLOSING = TcpState.CLOSING
LAST_ACK = TcpState.LAST_ACK
TIME_WAIT = TcpState.TIME_WAIT

# States in which data or our FIN may still need (re)transmission.
_SENDING = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK})
# States in which segment text is delivered (RFC 9293 3.10.7.4, seventh).
_RECEIVING = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})

DEFAULT_MSS = 536  # RFC 9293 3.7.1: assumed when the peer sends no MSS option
_TS_OPTION_LEN = 12  # NOP NOP TS, carried by every segment once negotiated
MIN_PATH_MTU = 552  # Linux's net.ipv4.route.min_pmtu: ICMP cannot push below it
# The earliest tail loss probe of a frozen (draining) TCB: see _arm_tlp.
FROZEN_PTO_FLOOR = 0.001
_MAX_WSCALE = 14  # RFC 7323 2.3


class Parent(Protocol):
    """What a connection born from a listener tells it (see listener.py)."""

    def child_established(self, conn: TcpConnection) -> bool:
        """Handshake done; False = accept queue full, keep SYN-RECEIVED."""
        ...

    def child_closed(self, conn: TcpConnection) -> None: ...


@dataclass(slots=True)
class TcpStats:
    opened_at: float = 0.0
    segments_sent: int = 0
    segments_received: int = 0
    bytes_sent: int = 0  # payload bytes sent for the first time
    bytes_received: int = 0  # in-order payload bytes delivered to recv_buf
    retransmits: int = 0  # segments (SYN, data, FIN) sent again
    retransmitted_bytes: int = 0
    fast_retransmits: int = 0
    rto_count: int = 0
    dup_acks: int = 0
    challenge_acks: int = 0
    challenge_acks_suppressed: int = 0  # over the per-second budget (RFC 5961 7)
    out_of_order: int = 0
    window_probes: int = 0
    paws_drops: int = 0
    keepalive_probes: int = 0  # RFC 9293 3.8.4 probes sent
    pmtu_updates: int = 0  # segment size lowered by ICMP fragmentation needed
    sack_recoveries: int = 0  # RFC 6675 loss recovery episodes
    sack_retransmits: int = 0  # segments resent from the scoreboard in them
    lost_retransmits: int = 0  # retransmissions found lost in recovery (and resent)
    tlp_probes: int = 0  # tail loss probes sent (RFC 8985 7)
    ecn_ce_received: int = 0  # segments that arrived marked CE (RFC 3168)
    ecn_reductions: int = 0  # window halvings for ECN-Echo (RFC 3168 6.1.2)


_TS_SECRET = secrets.token_bytes(32)


def _ts_offset(local_addr: bytes, remote_addr: bytes) -> int:
    digest = hashlib.blake2s(local_addr + remote_addr, key=_TS_SECRET, digest_size=4).digest()
    return int.from_bytes(digest, "big")


def ts_clock(local_addr: bytes, remote_addr: bytes, now: float) -> int:
    """The TSval a connection between these addresses sends at ``now`` (``ts_now``).

    A function of the addresses and the time only, so that a listener can
    answer with a SYN cookie (daemon/tcp/syncookie.py) in the clock of the
    connection it may build later.
    """
    return (int(now * 1000) + _ts_offset(local_addr, remote_addr)) & MASK


def _acceptable(seq: int, seg_len: int, rcv_nxt: int, wnd: int) -> bool:
    """RFC 9293 3.10.7.4 first check, the four-case acceptability table."""
    if seg_len == 0:
        return seq == rcv_nxt if wnd == 0 else seq_in_window(seq, rcv_nxt, wnd)
    if wnd == 0:
        return False
    last = (seq + seg_len - 1) & MASK
    if seq_in_window(seq, rcv_nxt, wnd) or seq_in_window(last, rcv_nxt, wnd):
        return True
    # Also a segment that covers the whole window from both sides (the RFC's
    # two tests miss it; it does carry the byte at RCV.NXT).
    return seq_lt(seq, rcv_nxt) and seq_ge(last, (rcv_nxt + wnd) & MASK)


@dataclass(slots=True, eq=False)
class TcpConnection:
    """The TCB (RFC 9293 3.3.1) plus buffers, timers and the state machine."""

    config: TcpConfig
    local: Endpoint
    remote: Endpoint
    state: TcpState = CLOSED
    events: deque[TcpEvent] = field(default_factory=deque)
    stats: TcpStats = field(default_factory=TcpStats)
    parent: Parent | None = None
    # Send sequence space.
    iss: int = 0
    snd_una: int = 0
    snd_nxt: int = 0
    snd_max: int = 0
    snd_wnd: int = 0
    snd_wl1: int = 0
    snd_wl2: int = 0
    max_snd_wnd: int = 0
    snd_wscale: int = 0
    snd_mss: int = DEFAULT_MSS  # payload per wire segment we send
    # Receive sequence space.
    irs: int = 0
    rcv_nxt: int = 0
    rcv_adv: int = 0
    rcv_wscale: int = 0
    # After a bounded splice: the right edge the relay offered the peer in
    # the other connection's name; segments up to it are still accepted
    # (``thaw``), whatever window this TCB advertises.  None: only rcv_adv.
    rcv_accept: int | None = None
    # RFC 9293 3.8.4 keep-alive: (idle, interval, count) seconds/probes, off
    # by default; the deadline of the next probe and the probes unanswered.
    keepalive: tuple[float, float, int] | None = None
    keepalive_deadline: float | None = None
    _ka_unanswered: int = field(init=False, default=0)
    # Negotiated options.
    peer_mss: int = DEFAULT_MSS
    wscale_ok: bool = False
    sack_ok: bool = False
    ts_ok: bool = False
    # RFC 3168: ECN negotiated in the handshake (6.1.1); CE seen, ECE to set
    # on every ACK until the peer's CWR (6.1.3); our window halved for an
    # ECE, CWR to set on the next new data (6.1.2).
    ecn_ok: bool = False
    # RFC 6437: the IPv6 flow label this connection's packets carry; None:
    # the daemon's hash of the 4-tuple (daemon/wire/flowlabel.py).  A TCB
    # restored from a kernel socket keeps the label the kernel gave it.
    flow_label: int | None = None
    _ece_pending: bool = field(init=False, default=False)
    _ecn_requested: bool = field(init=False, default=False)
    _cwr_pending: bool = field(init=False, default=False)
    ts_recent: int = 0
    ts_offset: int = 0
    _ts_sent: int | None = field(init=False, default=None)  # the newest TSval sent
    # Once spliced: the TSval this TCB never goes past, so that every TSval
    # the relay maps in its name is newer (daemon/splice/session.py,
    # TS_MARGIN); cleared when the TCB resumes (``thaw``).
    ts_cap: int | None = None
    # RFC 5961 7: challenge ACKs sent in the current one-second budget.
    challenge_since: float = -1.0
    challenge_sent: int = 0
    last_ack_sent: int = 0
    # Timers: absolute deadlines, None when not running.
    rto_deadline: float | None = None
    delack_deadline: float | None = None
    persist_deadline: float | None = None
    timewait_deadline: float | None = None
    tlp_deadline: float | None = None
    # Components, made in __post_init__ from the config.
    send_buf: SendBuffer = field(init=False)
    recv_buf: RecvBuffer = field(init=False)
    ooo: ReassemblyQueue = field(init=False)
    rto: RtoEstimator = field(init=False)
    cc: NewReno = field(init=False)
    # Private bookkeeping.
    _out: list[TcpSegment] = field(init=False, default_factory=list)
    _ack_now: bool = field(init=False, default=False)
    _rcv_unacked_segs: int = field(init=False, default=0)
    _fin_requested: bool = field(init=False, default=False)
    _fin_seq: int = field(init=False, default=0)
    _peer_fin_seq: int | None = field(init=False, default=None)
    _app_closed: bool = field(init=False, default=False)
    _retries: int = field(init=False, default=0)
    _retrans_since: float | None = field(init=False, default=None)
    _rtt_seq: int | None = field(init=False, default=None)
    _rtt_time: float = field(init=False, default=0.0)
    _persist_backoff: int = field(init=False, default=0)
    _probes_unanswered: int = field(init=False, default=0)
    _force_send: bool = field(init=False, default=False)
    _readable_signalled: bool = field(init=False, default=False)
    _send_blocked: bool = field(init=False, default=False)
    frozen: bool = field(init=False, default=False)
    # min_ack_delay: (arrival time, RCV.NXT after it) of what we may not ACK
    # yet, oldest first, and the highest RCV.NXT we may (None: not even the SYN).
    _rx_marks: deque[tuple[float, int]] = field(init=False, default_factory=deque)
    _ack_allowed: int | None = field(init=False, default=None)
    # RFC 6675: the scoreboard (made at the first SACK block received) and
    # HighRxt, the end of what this recovery retransmitted (absolute).
    _sack: Scoreboard | None = field(init=False, default=None)
    _high_rxt: int = field(init=False, default=0)
    # This recovery's retransmissions, (start, end, SND.MAX when sent), and
    # those found lost since, (start, end): see _find_lost_retransmissions.
    _rxt_marks: list[tuple[int, int, int]] = field(init=False, default_factory=list)
    _relost: list[tuple[int, int]] = field(init=False, default_factory=list)
    # RFC 8985 7 tail loss probe: when data or an ACK last moved (the PTO
    # counts from there), whether a probe is out, one MSS it may send past cwnd.
    _tlp_ref: float = field(init=False, default=0.0)
    _tlp_out: bool = field(init=False, default=False)
    _tlp_extra: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        c = self.config
        self.send_buf = SendBuffer(c.snd_buf, 0)
        self.recv_buf = RecvBuffer(c.rcv_buf)
        self.ooo = ReassemblyQueue()
        self.rto = RtoEstimator(min_rto=c.min_rto, max_rto=c.max_rto, rto=c.initial_rto)
        self.cc = NewReno.create(DEFAULT_MSS, c.initial_cwnd_segments, c.abc_limit_segments, 0)
        # RFC 7323 5.4 / 7.1: an offset hides the clock.  It is a keyed hash
        # of the address pair, as Linux does, not random per connection: a new
        # incarnation of a 4-tuple must carry newer TSvals than the old one, or
        # a peer still in TIME-WAIT rejects its SYN (PAWS, RFC 7323 5.3).
        self.ts_offset = _ts_offset(self.local[0], self.remote[0])

    # ------------------------------------------------------------------ opens

    @classmethod
    def connect(
        cls, config: TcpConfig, local: Endpoint, remote: Endpoint, iss: int, now: float
    ) -> TcpConnection:
        """Active open: the next ``poll_output`` sends the SYN."""
        conn = cls(config, local, remote)
        conn._init_send_space(iss)
        conn.state = SYN_SENT
        conn.stats.opened_at = now
        return conn

    @classmethod
    def accept_syn(
        cls,
        config: TcpConfig,
        local: Endpoint,
        remote: Endpoint,
        syn: TcpSegment,
        iss: int,
        now: float,
        parent: Parent | None = None,
    ) -> TcpConnection:
        """Passive open from a listener's SYN: SYN-RECEIVED, SYN-ACK pending.

        RFC 9293 3.10.7.2: RCV.NXT = SEG.SEQ+1, IRS = SEG.SEQ, send
        <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK>.  Text on the SYN is ignored (no
        TCP Fast Open); the peer sends it again.
        """
        conn = cls(config, local, remote, parent=parent)
        conn._init_send_space(iss)
        conn._on_peer_syn(syn)
        conn._mark_rx(now)
        conn.state = SYN_RECEIVED
        conn.stats.opened_at = now
        return conn

    @classmethod
    def restore(cls, config: TcpConfig, k: KernelTcpState, now: float) -> TcpConnection:
        """An ESTABLISHED TCB that carries on a kernel connection read by daemon/io/repair.py.

        What the kernel's socket knew becomes this TCB's: the sequence
        spaces, the options the handshake negotiated (window scale shifts,
        SACK, timestamps, ECN; not this daemon's config), the peer's MSS and
        window, ``ts_recent``, and a timestamp clock that goes on from the
        socket's (RFC 7323 5.4: the peer's PAWS check, 5.3, must never see
        it step back).  The bytes the peer has not acknowledged stay as the
        socket left them: what it had transmitted counts as sent, with the
        retransmission timer armed from the socket's own RTT estimate (its
        ACK is likely already on its way: a resend would cost the peer a
        duplicate, and a loss is repaired like any other), and what it had
        not transmitted yet goes out with the first ``poll_output``; the
        bytes the application did not read are readable.
        IRS and ISS are placed just before those queues, so a splice's base
        points (daemon/splice/session.py) put the unread bytes first on the
        other connection.  The congestion window and slow-start threshold
        are the socket's (same connection, same path: a pair handed over in
        the middle of a transfer drains its queues at the rate the kernel had
        reached, not in a new slow start); unknown, they start afresh
        (initial window, RFC 5681 3.1).  A connection whose peer has closed
        comes back in CLOSE_WAIT: its FIN is behind the unread bytes, counted
        in RCV.NXT as the socket counted it, and acknowledged already.
        """
        if len(k.unread) > config.rcv_buf or len(k.unacked) > config.snd_buf:
            raise ValueError("the kernel's queues do not fit this TCB's buffers")
        conn = cls(config, k.local, k.remote)
        conn.iss = (k.snd_una - 1) & MASK
        conn.snd_una = k.snd_una
        conn.snd_nxt = (k.snd_una + min(k.sent, len(k.unacked))) & MASK
        # Every queued byte may reach the peer from the socket itself: until
        # it is disconnected (repair.close_silently, right after the read) a
        # socket in repair mode still answers its own timers (a loss probe
        # sent the next unsent segment in a capture, after the read, when the
        # socket lived on until the proxy closed it), and an ACK of bytes
        # "not yet sent" would be dropped (RFC 9293 3.10.7.4) while this TCB,
        # its window full of them, waited for it: a stall for good.  SND.NXT < SND.MAX is the
        # go-back-N state (module docstring): we send from SND.NXT, the peer
        # may acknowledge up to SND.MAX.
        conn.snd_max = (k.snd_una + len(k.unacked)) & MASK
        conn.send_buf.seq = k.snd_una
        conn.send_buf.write(k.unacked)
        if k.srtt is not None:
            conn.rto.seed(k.srtt, k.rttvar)
        if conn.snd_nxt != conn.snd_una:
            conn.rto_deadline = now + conn.rto.current()  # RFC 6298 5.1, for what is in flight
            conn._tlp_ref = now  # RFC 8985 7.2: its last transmission is no later than now
        fin = 1 if k.fin_received else 0
        conn.irs = (k.rcv_nxt - fin - len(k.unread) - 1) & MASK
        conn.rcv_nxt = conn.last_ack_sent = k.rcv_nxt
        conn.recv_buf.append(k.unread)
        conn.wscale_ok = k.wscale_ok
        conn.snd_wscale, conn.rcv_wscale = (k.snd_wscale, k.rcv_wscale) if k.wscale_ok else (0, 0)
        # What the socket advertised stays open to the peer (RFC 9293
        # 3.8.6.2.2: do not shrink the window); our own buffer from now on.
        free = min(conn.recv_buf.free(), 0xFFFF << conn.rcv_wscale)
        conn.rcv_adv = (k.rcv_nxt + free) & MASK
        edge = (k.rcv_wup + k.rcv_wnd) & MASK
        if seq_gt(edge, conn.rcv_adv):
            conn.rcv_accept = edge
        conn.sack_ok, conn.ts_ok, conn.ecn_ok = k.sack_ok, k.ts_ok, k.ecn_ok
        conn.flow_label = k.flow_label
        conn.snd_wnd = k.snd_wnd
        conn.max_snd_wnd = max(k.max_window, k.snd_wnd)
        conn.snd_wl1, conn.snd_wl2 = k.snd_wl1, k.snd_una
        conn.peer_mss = k.peer_mss or DEFAULT_MSS
        ts_len = _TS_OPTION_LEN if conn.ts_ok else 0
        conn.snd_mss = max(min(conn.peer_mss, config.mss) - ts_len, 64)
        conn.cc = NewReno.create(
            conn.snd_mss, config.initial_cwnd_segments, config.abc_limit_segments, k.snd_una
        )
        if k.snd_cwnd > 0:
            conn.cc.cwnd = k.snd_cwnd * conn.snd_mss
        if k.snd_ssthresh is not None:
            conn.cc.ssthresh = max(k.snd_ssthresh, 2) * conn.snd_mss  # RFC 5681 (4): >= 2 SMSS
        if conn.ts_ok:
            conn.ts_recent = k.ts_recent
            # ts_now(now) == the socket's clock now, and never below what it sent.
            conn.ts_offset = (k.ts_now - int(now * 1000)) & MASK
            conn._ts_sent = (k.ts_now - 1) & MASK
        conn.state = CLOSE_WAIT if k.fin_received else ESTABLISHED
        conn.stats.opened_at = now
        conn._mark_rx(now)
        return conn

    def syn_ack_sent_as_cookie(self, now: float) -> None:
        """A passive open whose SYN-ACK went out earlier as a SYN cookie (daemon/tcp/syncookie.py).

        The state is what sending it would have left (``_syn_segment``), so
        the ACK that follows establishes the connection; but no RTT sample
        and no retransmission timer: its send time was never kept.
        """
        self._syn_segment(now)
        self._rtt_seq = None
        self.rto_deadline = None

    def _init_send_space(self, iss: int) -> None:
        self.iss = self.snd_una = self.snd_nxt = self.snd_max = iss
        self.send_buf.seq = (iss + 1) & MASK
        self.cc.recover = self.cc.ecn_recover = iss

    def _on_peer_syn(self, seg: TcpSegment) -> None:
        """Record the peer's SYN: IRS and the options of RFC 7323 / 2018 / 9293 3.7.1."""
        c = self.config
        o = seg.options
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_adv = self.last_ack_sent = (seg.seq + 1) & MASK
        # RFC 7323 2.2: scaling is on only if both SYNs carry the option.
        self.wscale_ok = c.rcv_wscale is not None and o.wscale is not None
        if self.wscale_ok and o.wscale is not None and c.rcv_wscale is not None:
            self.snd_wscale = min(o.wscale, _MAX_WSCALE)
            self.rcv_wscale = min(c.rcv_wscale, _MAX_WSCALE)
        else:
            self.snd_wscale = self.rcv_wscale = 0
        self.sack_ok = c.sack and o.sack_permitted
        self.ts_ok = c.timestamps and o.timestamp is not None
        if self.state is CLOSED:
            # RFC 3168 6.1.1: an ECN-setup SYN has ECE and CWR both set.
            self.ecn_ok = c.ecn and seg.flags & (ECE | CWR) == ECE | CWR
        if o.timestamp is not None:
            self.ts_recent = o.timestamp[0]
        self.peer_mss = o.mss if o.mss else DEFAULT_MSS
        # RFC 9293 3.7.1: the MSS excludes options; the TS option we put in
        # every segment comes out of the peer's MSS, as Linux's mss_cache.
        self.snd_mss = max(min(self.peer_mss, c.mss) - (_TS_OPTION_LEN if self.ts_ok else 0), 64)
        self.cc.mss = self.snd_mss
        self.cc.cwnd = c.initial_cwnd_segments * self.snd_mss
        # RFC 7323 2.2: the window of a SYN is never scaled.
        self.snd_wnd = seg.window
        self.max_snd_wnd = seg.window
        self.snd_wl1 = seg.seq
        self.snd_wl2 = seg.ack

    # ------------------------------------------------------------ app calls

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes for sending; returns how many fit (0 when the buffer is full).

        Raises BrokenPipeError after shutdown_write/close or when the
        connection is gone, like send(2).
        """
        if self._fin_requested or self.state not in (
            SYN_SENT,
            SYN_RECEIVED,
            ESTABLISHED,
            CLOSE_WAIT,
        ):
            raise BrokenPipeError(f"send() in {self.state.value} after shutdown or close")
        n = self.send_buf.write(data)
        if n < len(data):
            self._send_blocked = True
        return n

    def send_space(self) -> int:
        if self._fin_requested:
            return 0
        return self.send_buf.space()

    def readable(self) -> int:
        return len(self.recv_buf)

    def recv(self, max_bytes: int) -> bytes:
        """In-order bytes for the application; reading opens the window."""
        data = self.recv_buf.read(max_bytes)
        self._readable_signalled = False
        if data and self.state in _RECEIVING:
            # RFC 1122 4.2.3.3: announce the opened window only once it
            # grew by a useful amount (SWS avoidance on the receive side), and
            # only to a sender the window may hold back: with a few MSS still
            # open it keeps sending, and the ACKs of its data carry the new
            # window (as Linux's tcp_cleanup_rbuf, which waits for a window
            # that halved).  Else every request a proxy reads would cost a
            # pure ACK just before its reply carries the same ACK.
            cur = max(seq_sub(self.rcv_adv, self.rcv_nxt), 0)
            free = min(self.recv_buf.free(), 0xFFFF << self.rcv_wscale)
            cap = self.recv_buf.capacity
            mss = self.config.mss
            thresh = min(cap // 2, mss if cur < mss else 2 * mss)
            if cur < 4 * mss and free - cur >= thresh:
                self._ack_now = True
        return data

    def shutdown_write(self) -> None:
        """Queue a FIN after all data already sent (RFC 9293 3.10.4 CLOSE, half)."""
        if self._fin_requested or self.state not in (
            SYN_SENT,
            SYN_RECEIVED,
            ESTABLISHED,
            CLOSE_WAIT,
        ):
            return
        self._fin_requested = True
        self._fin_seq = (self.send_buf.seq + len(self.send_buf)) & MASK
        # RFC 9293 3.10.4: SYN-SENT / SYN-RECEIVED keep the FIN queued until
        # ESTABLISHED; the diagram's CLOSE-WAIT --close--> LAST-ACK.
        if self.state is ESTABLISHED:
            self.state = FIN_WAIT_1
        elif self.state is CLOSE_WAIT:
            self.state = LAST_ACK

    def close(self) -> None:
        """Like close(2): FIN after pending data, or RST if unread data is lost.

        RFC 1122 4.2.2.13: closing with received data still unread, or data
        arriving after close, is answered with RST so the peer learns it was
        lost.
        """
        st = self.state
        if st is CLOSED:
            return
        if st is SYN_SENT:
            self._enter_closed(None)  # RFC 9293 3.10.4: delete the TCB
            return
        if len(self.recv_buf) and st in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, FIN_WAIT_2):
            self.abort()
            return
        self._app_closed = True
        self.shutdown_write()

    def abort(self) -> None:
        """RST now (RFC 9293 3.10.5 ABORT).  Call poll_output once more to flush it."""
        st = self.state
        if st in (SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT):
            self._out.append(self._make(self.snd_max, RST, b"", None))
        if st is not CLOSED:
            self._enter_closed(None)

    # ------------------------------------------------------------- splice

    def freeze(self) -> bytes:
        """Thesis 4.1 ``splice``: receive no more text; return what was never read.

        From now on the caller gives this TCB only the acknowledgment part of
        the segments that arrive (``on_ack``); their text and FIN are the
        relay's.  RCV.NXT therefore stays where it is: every segment this TCB
        still sends acknowledges exactly what it received, which is the
        relay's base point for this side (daemon/splice/session.py).
        """
        self.frozen = True
        self.delack_deadline = None
        self._ack_now = False
        # The CE it echoed was on data the relay no longer answers for; from
        # now on ECE and CWR cross the splice between the peers themselves.
        self._ece_pending = self._cwr_pending = False
        return self.recv_buf.read(len(self.recv_buf))

    def thaw(
        self,
        *,
        sent: int,
        received: int,
        peer_window: tuple[int, int, int] | None,
        ts_recent: int | None,
        ts_floor: int | None,
        now: float,
        rcv_edge: int | None = None,
    ) -> None:
        """A bounded splice hands the connection back: resume where the relay left it.

        While frozen the relay sent ``sent`` bytes on this connection in our
        send space (all acknowledged: the hand-back waits for that) and
        relayed ``received`` bytes of the peer's stream away.  Both spaces
        move past them, so the peer sees one continuous connection.
        ``peer_window`` is (window field, seq, ack) of the latest segment
        from the peer (RFC 9293 3.10.7.4: SND.WND, WL1, WL2), ``ts_recent``
        its latest TSval, and ``ts_floor`` the newest TSval the relay sent
        the peer in our name: our clock jumps past it, or the peer's PAWS
        check (RFC 7323 5.3) would drop everything we send from now on.
        ``rcv_edge``: the right edge of the window the relay offered the
        peer (the other connection's window).  We accept up to it, since the
        peer may already be sending that far, but advertise our own buffer
        from now on: that shrinks the window, which RFC 9293 3.8.6.2.2 asks
        receivers not to do and RFC 1122 4.2.2.16 asks senders to cope with;
        nothing sent in good faith is dropped, and the peer's next burst is
        what we can hold rather than what the other peer could (a bounded
        splice's next body should wait at the peer, to be relayed, not
        cross through this TCB).
        """
        assert self.frozen and self.all_acked(), "thaw: the TCB has not drained"
        snd = (self.snd_max + sent) & MASK
        self.snd_una = self.snd_nxt = self.snd_max = snd
        self.send_buf.seq = snd
        self.rcv_nxt = self.last_ack_sent = (self.rcv_nxt + received) & MASK
        # Our own buffer is the window we advertise again; what the relay
        # offered beyond it is still accepted (``rcv_accept``, see above).
        self.rcv_adv = (self.rcv_nxt + self.recv_buf.capacity - len(self.recv_buf)) & MASK
        self.rcv_accept = (
            rcv_edge if rcv_edge is not None and seq_gt(rcv_edge, self.rcv_adv) else None
        )
        if peer_window is not None:
            field_, wl1, wl2 = peer_window
            self.snd_wnd = field_ << self.snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self.snd_wl1, self.snd_wl2 = wl1, wl2
        self.ts_cap = None
        if self.ts_ok:
            if ts_recent is not None:
                self.ts_recent = ts_recent
            if ts_floor is not None:
                ahead = (ts_floor - self.ts_now(now)) & MASK
                if ahead < 0x80000000:
                    self.ts_offset = (self.ts_offset + ahead + 1) & MASK
        self.frozen = False
        self._rtt_seq = None
        self._retries = 0
        self._retrans_since = None
        self.rto_deadline = self.persist_deadline = self.delack_deadline = None
        self._ack_now = False

    def on_ack(
        self,
        seq: int,
        ack: int,
        window: int,
        flags: int,
        has_text: bool,
        timestamp: tuple[int, int] | None,
        now: float,
    ) -> None:
        """The acknowledgment of a segment that arrived while frozen.

        RFC 9293 3.10.7.4 fifth step only (a frozen TCB receives no text):
        new ACKs free the send buffer and drive retransmission, duplicate ACKs
        count only for segments without text (RFC 5681 2: the peer's relayed
        data segments repeat SND.UNA without being duplicates), and the
        window updates with the segment's real SEQ in the WL1/WL2 test.
        PAWS (RFC 7323 5.3) still discards an old duplicate.
        """
        if self.state is CLOSED or not flags & ACK or flags & (SYN | RST):
            return
        if self.ts_ok and timestamp is not None:
            if seq_lt(timestamp[0], self.ts_recent):
                self.stats.paws_drops += 1
                return
            # RFC 7323 4.3 would take TSval only from a segment at RCV.NXT;
            # frozen, RCV.NXT never moves, and the newest TSval is the one the
            # peer's RTT measurement needs echoed.
            self.ts_recent = timestamp[0]
        self.stats.segments_received += 1
        self._ack_field(seq, ack, window, flags, has_text, now)
        self._ack_now = False  # nothing was received that needs an ACK

    def all_acked(self) -> bool:
        """Everything queued, data and a requested FIN, is sent and acknowledged."""
        if len(self.send_buf) or self.snd_una != self.snd_max:
            return False
        return not self._fin_requested or self.snd_una == (self._fin_seq + 1) & MASK

    @property
    def peer_closed(self) -> bool:
        """The peer's FIN has arrived in order (CLOSE-WAIT and the states after it)."""
        return self.state in (CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT)

    # -------------------------------------------------------------- timers

    def next_deadline(self) -> float | None:
        best: float | None = None
        for t in (
            self.rto_deadline,
            self.delack_deadline,
            self.persist_deadline,
            self.timewait_deadline,
            self.keepalive_deadline,
            self.tlp_deadline,
        ):
            if t is not None and (best is None or t < best):
                best = t
        if self._rx_marks:
            t = self._rx_marks[0][0] + self.config.min_ack_delay
            if best is None or t < best:
                best = t
        return best

    def on_timer(self, now: float) -> None:
        if self.timewait_deadline is not None and now >= self.timewait_deadline:
            self.timewait_deadline = None
            self._enter_closed(None)  # RFC 9293 3.10.8: 2*MSL is over
            return
        if self.rto_deadline is not None and now >= self.rto_deadline:
            self.rto_deadline = None
            self.tlp_deadline = None
            self._on_rto(now)
        if self.tlp_deadline is not None and now >= self.tlp_deadline:
            self.tlp_deadline = None
            self._on_pto(now)
        if self.persist_deadline is not None and now >= self.persist_deadline:
            self.persist_deadline = None
            self._on_persist(now)
        if self.delack_deadline is not None and now >= self.delack_deadline:
            self.delack_deadline = None
            self._ack_now = True
        if self._rx_marks and now >= self._rx_marks[0][0] + self.config.min_ack_delay:
            self._ack_now = True  # received sequence space may be acknowledged now
        if self.keepalive_deadline is not None and now >= self.keepalive_deadline:
            self.keepalive_deadline = None
            self._on_keepalive(now)

    def on_path_mtu(self, mtu: int, seq: int) -> bool:
        """ICMP "fragmentation needed" (RFC 1191, RFC 8201 for v6): a smaller path MTU.

        ``seq`` is the quoted segment's sequence number: acted on only if it
        lies in [SND.UNA, SND.NXT] (RFC 5927 4.1, against blind forgeries).
        The segment size shrinks to what fits (never below Linux's 552-byte
        minimum path MTU, which an attacker cannot push it under), and what
        is in flight goes again at the new size at once (RFC 1191 6.5: the
        lost segment was too big; waiting for the RTO would cost a second).
        True if the size changed.
        """
        if self.state not in _SENDING and self.state is not SYN_SENT:
            return False
        if not (seq_le(self.snd_una, seq) and seq_le(seq, self.snd_nxt)):
            return False
        if len(self.local[0]) == 16:
            # RFC 8200 5: no IPv6 link is smaller; the header is 20 bytes more.
            mtu, headers = max(mtu, MIN_IPV6_MTU), 60
        else:
            mtu, headers = max(mtu, MIN_PATH_MTU), 40
        mss = mtu - headers - (_TS_OPTION_LEN if self.ts_ok else 0)
        if mss >= self.snd_mss:
            return False
        self.snd_mss = mss
        self.stats.pmtu_updates += 1
        if self.state is not SYN_SENT and self.snd_una != self.snd_max:
            self.snd_nxt = self.snd_una  # send the flight again, cut to the new size
            self._rtt_seq = None  # Karn: no RTT sample from a retransmission
        return True

    def set_keepalive(self, params: tuple[float, float, int] | None, now: float) -> None:
        """RFC 9293 3.8.4: probe an idle connection; None turns it off (the default).

        ``params`` are (idle seconds before the first probe, seconds between
        probes, unanswered probes before the connection times out).
        """
        self.keepalive = params
        self._ka_unanswered = 0
        self.keepalive_deadline = None if params is None else now + params[0]

    def _on_keepalive(self, now: float) -> None:
        ka = self.keepalive
        if ka is None or self.state not in (ESTABLISHED, CLOSE_WAIT) or self.frozen:
            return
        idle, interval, count = ka
        if self.snd_una != self.snd_max or len(self.send_buf):
            # RFC 9293 3.8.4: only while no sent data is outstanding; the
            # retransmission timer watches the peer meanwhile.
            self.keepalive_deadline = now + idle
            return
        if self._ka_unanswered >= count:
            # As Linux does: the peer is gone; tell it, in case it is not.
            self._out.append(self._make(self.snd_max, RST, b"", None))
            self._enter_closed(TcpEvent.TIMED_OUT)
            return
        # RFC 1122 4.2.3.6: SEG.SEQ = SND.NXT-1, no data: an old sequence
        # number the peer must answer with an ACK.
        self._out.append(self._make((self.snd_nxt - 1) & MASK, ACK, b"", now))
        self._ka_unanswered += 1
        self.stats.keepalive_probes += 1
        self.keepalive_deadline = now + interval

    def _on_rto(self, now: float) -> None:
        st = self.state
        if st is SYN_SENT or st is SYN_RECEIVED:
            self._retries += 1
            if self._retries > self.config.syn_retries:
                if st is SYN_RECEIVED:
                    self._out.append(self._make(self.snd_max, RST, b"", None))
                self._enter_closed(TcpEvent.TIMED_OUT)
                return
            self.stats.rto_count += 1
            self.rto.on_timeout()
            self.snd_nxt = self.iss  # poll_output sends the SYN (or SYN-ACK) again
            self._rtt_seq = None
            return
        if st not in _SENDING or self.snd_una == self.snd_max:
            return
        self._retries += 1
        self.stats.rto_count += 1
        if self._retrans_since is None:
            self._retrans_since = now
        ut = self.config.user_timeout
        if self._retries > self.config.max_retries or (
            ut is not None and now - self._retrans_since >= ut
        ):
            self._out.append(self._make(self.snd_max, RST, b"", None))
            self._enter_closed(TcpEvent.TIMED_OUT)
            return
        flight = seq_sub(self.snd_max, self.snd_una)
        self.cc.on_rto(flight, self.snd_max, first=self._retries == 1)
        if self._sack is not None:
            self._sack.clear()  # RFC 6675 5.1 / RFC 2018 8: the receiver may renege
        self._rxt_marks, self._relost = [], []
        self.rto.on_timeout()  # RFC 6298 5.5
        self.snd_nxt = self.snd_una  # RFC 6298 5.4, go-back-N from SND.UNA
        self._rtt_seq = None  # Karn: no sample from what is now retransmitted

    def _on_persist(self, now: float) -> None:
        if self.state not in _SENDING:
            return
        self._probes_unanswered += 1
        if self._probes_unanswered > self.config.max_retries:
            # RFC 1122 4.2.2.17 forbids giving up while probes are answered;
            # every acceptable ACK resets this count, so these went unanswered.
            self._out.append(self._make(self.snd_max, RST, b"", None))
            self._enter_closed(TcpEvent.TIMED_OUT)
            return
        flight = seq_sub(self.snd_nxt, self.snd_una)
        if min(self.snd_wnd, self.cc.cwnd) - flight > 0:
            # RFC 1122 4.2.3.4: the SWS override timer -- send what fits.
            self._force_send = True
            return
        # RFC 9293 3.8.6.1: probe the zero window, backing off (see module doc).
        self._out.append(self._make((self.snd_una - 1) & MASK, ACK, b"", now))
        self.stats.window_probes += 1
        self._persist_backoff += 1
        self._arm_persist(now)

    def _arm_persist(self, now: float) -> None:
        if self.persist_deadline is None:
            interval = self.rto.current() * (1 << min(self._persist_backoff, 16))
            self.persist_deadline = now + min(interval, self.config.persist_max)

    # -------------------------------------------------------------- input

    def reopens_with(self, seg: TcpSegment) -> bool:
        """Does ``seg`` end this TIME-WAIT and open a new connection on the 4-tuple?

        RFC 9293 3.10.7.4 (TIME-WAIT may accept a new SYN) with RFC 6191's
        test: a SYN (no ACK) beyond the old connection's sequence space, or,
        with timestamps, with a newer TSval.  The caller frees this TCB and
        hands ``seg`` to the listener.
        """
        if self.state is not TIME_WAIT or seg.flags & (SYN | ACK | RST) != SYN:
            return False
        ts = seg.options.timestamp
        if self.ts_ok and ts is not None:
            return seq_gt(ts[0], self.ts_recent)
        return seq_gt(seg.seq, self.rcv_nxt)

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one arriving segment (RFC 9293 3.10.7)."""
        self.stats.segments_received += 1
        if self.keepalive is not None:
            # Anything from the peer answers the probes and restarts the idle time.
            self._ka_unanswered = 0
            self.keepalive_deadline = now + self.keepalive[0]
        st = self.state
        if st is CLOSED:
            rst = reset_for_unknown(seg)  # RFC 9293 3.10.7.1
            if rst is not None:
                self._out.append(rst)
            return
        if st is SYN_SENT:
            self._on_segment_syn_sent(seg, now)
            return
        flags = seg.flags
        seq = seg.seq
        if st is SYN_RECEIVED and flags & (SYN | ACK | RST) == SYN and seq == self.irs:
            # The peer retransmitted its SYN: our SYN-ACK was lost; resend it.
            self.snd_nxt = self.iss
            return
        ts = seg.options.timestamp
        if self.ts_ok and ts is not None and not flags & RST and seq_lt(ts[0], self.ts_recent):
            # RFC 7323 5.3 PAWS: an old duplicate; drop it, but ACK.
            self.stats.paws_drops += 1
            self._ack_now = True
            return

        # First: sequence number acceptability (RFC 9293 3.10.7.4).
        rcv_nxt = self.rcv_nxt
        rcv_wnd = max(seq_sub(self.rcv_adv, rcv_nxt), 0)
        if self.rcv_accept is not None:
            accept = seq_sub(self.rcv_accept, rcv_nxt)
            if accept > rcv_wnd:
                rcv_wnd = accept
            else:
                self.rcv_accept = None  # caught up: our own window again
        payload = seg.payload
        plen = len(payload)
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        # With a zero window, still take the ACK of a segment at RCV.NXT (RFC
        # 9293 3.10.7.4 "special allowance"); its text is trimmed away below.
        if not _acceptable(seq, seg_len, rcv_nxt, rcv_wnd) and not (
            rcv_wnd == 0 and seq == rcv_nxt
        ):
            if not flags & RST:
                self._ack_now = True
                if st is TIME_WAIT and flags & FIN:
                    # RFC 9293 3.10.7.4 eighth: a retransmitted FIN restarts 2*MSL.
                    self.timewait_deadline = now + 2 * self.config.msl
            return

        # Second: RST (RFC 5961 3.2: only an exact match resets).
        if flags & RST:
            if seq == rcv_nxt:
                self._on_reset()
            else:
                self._challenge_ack(now)
            return

        # Fourth: SYN in a synchronized state (RFC 5961 4.2, RFC 9293 3.10.7.4).
        if flags & SYN:
            self._challenge_ack(now)
            return

        if self.ecn_ok:
            # RFC 3168 6.1.3: echo CE with ECE on every ACK until the peer's
            # CWR says it reduced its window; a segment with both is new CE.
            if flags & CWR:
                self._ece_pending = False
            if seg.ecn == ECN_CE:
                self.stats.ecn_ce_received += 1
                if not self._ece_pending:
                    self._ack_now = True  # tell the sender at once, as Linux's quick ACK
                self._ece_pending = True

        # Fifth: the ACK field.
        if not flags & ACK:
            return
        if ts is not None and self.ts_ok and seq_le(seq, self.last_ack_sent):
            # RFC 7323 4.3: remember the TSval to echo (PAWS passed above).
            self.ts_recent = ts[0]
        ack = seg.ack
        if st is SYN_RECEIVED:
            if not (seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_max)):
                self._out.append(TcpSegment(self.local[1], self.remote[1], ack, 0, RST, 0))
                return
            if self.parent is not None and not self.parent.child_established(self):
                return  # accept queue full: drop, the peer retransmits (as Linux)
            self.snd_wnd = seg.window << self.snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            self._established()
            st = self.state
        if not self._process_ack(seg, ack, now):
            return
        if flags & ECE and self.ecn_ok:
            self._on_ecn_echo()
        st = self.state
        if st is CLOSED:
            return

        # Seventh: segment text.  Other states ignore it: the peer's FIN
        # came before, so this can only be a retransmission (RFC 9293 3.10.7.4).
        if st not in _RECEIVING or not (plen or flags & FIN):
            return
        if plen and self._app_closed and seq_gt((seq + plen) & MASK, self.rcv_nxt):
            # RFC 1122 4.2.2.13: data after close() is lost; say so.
            self._out.append(self._make(self.snd_max, RST, b"", None))
            self._enter_closed(None)
            return
        # Eighth: FIN, once every byte before it has arrived.
        if self._receive_text(seq, payload, flags & FIN, rcv_wnd, now):
            self._receive_fin(now)

    def _on_segment_syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 3.10.7.3."""
        flags = seg.flags
        ack = seg.ack
        if flags & ACK and (seq_le(ack, self.iss) or seq_gt(ack, self.snd_max)):
            if not flags & RST:
                self._out.append(TcpSegment(self.local[1], self.remote[1], ack, 0, RST, 0))
            return
        if flags & RST:
            # RFC 5961 3.2 keeps RFC 9293's rule here: acceptable iff it acks our SYN.
            if flags & ACK:
                self._enter_closed(TcpEvent.REFUSED)
            return
        if not flags & SYN:
            return
        self._on_peer_syn(seg)
        self._mark_rx(now)
        if flags & ACK:
            # RFC 3168 6.1.1: our ECN-setup SYN answered by ECE without CWR.
            self.ecn_ok = self._ecn_requested and flags & (ECE | CWR) == ECE
            self.snd_wnd = seg.window  # a SYN's window is unscaled (RFC 7323 2.2)
            self._process_ack(seg, ack, now)
            self._established()
            self._ack_now = True
            if seg.payload or flags & FIN:
                # Text or FIN on the SYN-ACK: RFC 9293 3.10.7.3 continues at step six.
                fin = self._receive_text(seg.seq + 1, seg.payload, flags & FIN, 0xFFFF, now)
                if fin:
                    self._receive_fin(now)
        else:
            # Simultaneous open (RFC 9293 Figure 8): SYN-RECEIVED, send SYN,ACK.
            self.state = SYN_RECEIVED
            self.snd_nxt = self.iss

    def _on_ecn_echo(self) -> None:
        """RFC 3168 6.1.2: the peer saw CE on our data; halve once per window, then CWR.

        CWR goes on the next new data even when this ECE found the window
        already reduced (by an earlier ECE or a loss in the same flight):
        the reduction it asks for has been made, and CWR ends the echo.
        """
        flight = seq_sub(self.snd_max, self.snd_una)
        if self.cc.on_ecn_echo(self.snd_una, self.snd_max, flight):
            self.stats.ecn_reductions += 1
        self._cwr_pending = True

    def _established(self) -> None:
        # RFC 9293 3.10.4: a CLOSE queued in SYN-SENT/RECEIVED now takes effect.
        self.state = FIN_WAIT_1 if self._fin_requested else ESTABLISHED
        self._retries = 0
        self.events.append(TcpEvent.ESTABLISHED)

    def _process_ack(self, seg: TcpSegment, ack: int, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth step for synchronized states; False = drop segment."""
        sack = seg.options.sack_blocks if self.sack_ok and self.config.sack_recovery else ()
        return self._ack_field(seg.seq, ack, seg.window, seg.flags, bool(seg.payload), now, sack)

    def _ack_field(
        self,
        seq: int,
        ack: int,
        window: int,
        flags: int,
        has_text: bool,
        now: float,
        sack: tuple[tuple[int, int], ...] = (),
    ) -> bool:
        snd_una = self.snd_una
        if seq_gt(ack, self.snd_max):
            self._ack_now = True  # acks something not yet sent: ACK and drop
            return False
        if seq_lt(ack, (snd_una - self.max_snd_wnd) & MASK):
            self._challenge_ack(now)  # RFC 5961 5.2: too old to be real
            return False
        wnd = window << self.snd_wscale if not flags & SYN else window
        new = ack != snd_una and seq_gt(ack, snd_una)
        if new:
            self._on_new_ack(ack, now)  # shifts the scoreboard too
        elif ack != snd_una:
            return True  # an old ACK: ignore the field, keep the text
        newly_sacked = False
        if sack:
            # RFC 6675 Update(), against the SND.UNA this ACK leaves (= ack).
            if self._sack is None:
                self._sack = Scoreboard()
            newly_sacked = self._sack.update(ack, seq_sub(self.snd_max, ack), sack)
            if self.cc.sack_recovery and self._rxt_marks:
                self._find_lost_retransmissions()
        if not new and self.snd_max != snd_una and not has_text and not flags & (SYN | FIN):
            if sack:
                # RFC 6675 2: with SACK, a duplicate ACK is one that SACKs new
                # data (its window may differ); in recovery it only feeds the
                # scoreboard and the pipe.
                if newly_sacked and not self.cc.in_recovery:
                    self.stats.dup_acks += 1
                    self.cc.dupacks += 1
                    self._maybe_sack_recovery(now)
            elif wnd == self.snd_wnd and self.persist_deadline is None:
                # RFC 5681 2: without SACK, a duplicate ACK also leaves the
                # window alone.
                self.stats.dup_acks += 1
                flight = seq_sub(self.snd_max, snd_una)
                if self.cc.on_dup_ack(snd_una, self.snd_max, flight):
                    self.stats.fast_retransmits += 1
                    self._retransmit_first(now)
        # Window update, guarded by WL1/WL2 against old segments (RFC 9293 3.10.7.4).
        if seq_lt(self.snd_wl1, seq) or (self.snd_wl1 == seq and seq_le(self.snd_wl2, ack)):
            self.snd_wnd = wnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if wnd > self.max_snd_wnd:
                self.max_snd_wnd = wnd
        # An acceptable ACK answers our probes; an open window ends probing.
        self._probes_unanswered = 0
        if self.snd_wnd > 0:
            self._persist_backoff = 0
            self.persist_deadline = None
        return True

    def _maybe_sack_recovery(self, now: float) -> None:
        """RFC 6675 5 (4): enter recovery at DupThresh duplicates, or once SND.UNA is lost."""
        board = self._sack
        if board is None:
            return
        if self.cc.dupacks < DUP_THRESH and not board.is_lost(0, self.snd_mss):
            return
        flight = seq_sub(self.snd_max, self.snd_una)
        if not self.cc.enter_sack_recovery(self.snd_una, self.snd_max, flight):
            return
        self.stats.sack_recoveries += 1
        self.stats.fast_retransmits += 1
        # (4.3): the first segment now, HighRxt at its end; the pipe loop of
        # _output_data sends the rest.
        self._high_rxt = self.snd_una
        self._retransmit_first(now)
        end = (self.snd_una + min(self.snd_mss, flight)) & MASK
        self._high_rxt = end
        self._rxt_marks = [(self.snd_una, end, self.snd_max)]
        self._relost = []

    def _on_new_ack(self, ack: int, now: float) -> None:
        acked = seq_sub(ack, self.snd_una)
        flight_before = seq_sub(self.snd_max, self.snd_una)
        buf = self.send_buf
        data_acked = min(max(seq_sub(ack, buf.seq), 0), len(buf))
        if data_acked:
            buf.consume(data_acked)
        if self._sack is not None:
            self._sack.advance(acked)
        self.snd_una = ack
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack
        # RTT from one timed segment per flight, Karn-safe (RFC 6298 3).  Not
        # from TSecr: RFC 7323 4.3 makes a receiver echo an old TSval to
        # duplicates it drops, so after lost ACKs a go-back-N retransmission
        # yields samples of many seconds that blow the RTO up.
        if self._rtt_seq is not None and seq_ge(ack, self._rtt_seq):
            self.rto.on_rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
        self.rto.on_new_ack()
        self._tlp_ref = now
        self._tlp_out = False
        self._retries = 0
        self._retrans_since = None
        if (data_acked or self.cc.in_recovery) and self.cc.on_new_ack(acked, ack, flight_before):
            self._retransmit_first(now)  # RFC 6582 3.2 step 3: partial ACK
        if not self.cc.in_recovery and self._rxt_marks:
            self._rxt_marks, self._relost = [], []
        # RFC 6298 5.2 / 5.3: stop the timer when all is acked, else restart it.
        self.rto_deadline = None if ack == self.snd_max else now + self.rto.current()
        if self._send_blocked and buf.space() > 0:
            self._send_blocked = False
            self.events.append(TcpEvent.SEND_SPACE)
        if self._fin_requested and ack == ((self._fin_seq + 1) & MASK):
            self._on_fin_acked(now)

    def _on_fin_acked(self, now: float) -> None:
        st = self.state
        if st is FIN_WAIT_1:
            self.state = FIN_WAIT_2
        elif st is CLOSING:
            self._enter_time_wait(now)
        elif st is LAST_ACK:
            self._enter_closed(None)

    def _receive_text(
        self, seq: int, payload: bytes | memoryview, fin: int, rcv_wnd: int, now: float
    ) -> int:
        """RFC 9293 3.10.7.4 seventh step; returns ``fin`` if the FIN is now in order."""
        rcv_nxt = self.rcv_nxt
        off = seq_sub(seq, rcv_nxt)
        plen = len(payload)
        if off < 0:
            payload = payload[-off:]  # already received: trim the head
            plen = len(payload)
            off = 0
        if off + plen > rcv_wnd:
            # Beyond the window: trim the tail; the FIN went with it.
            payload = payload[: max(rcv_wnd - off, 0)]
            plen = len(payload)
            fin = 0
            self._ack_now = True
        if off > 0:
            # Out of order: queue, and ACK at once so the sender sees a
            # duplicate ACK with SACK blocks (RFC 5681 4.2, RFC 2018 4).
            if plen:
                self.ooo.insert(rcv_nxt, seq, payload, rcv_wnd)
                self.stats.out_of_order += 1
            if fin:
                self._peer_fin_seq = (seq + plen) & MASK
            self._ack_now = True
            return 0
        if plen == 0:
            return fin
        self.recv_buf.append(payload)
        rcv_nxt = (rcv_nxt + plen) & MASK
        delivered = plen
        if self.ooo:
            ready = self.ooo.pop_ready(rcv_nxt)
            while ready is not None:
                self.recv_buf.append(ready)
                rcv_nxt = (rcv_nxt + len(ready)) & MASK
                delivered += len(ready)
                ready = self.ooo.pop_ready(rcv_nxt)
            self._ack_now = True  # RFC 5681 4.2: ACK a segment that fills a hole at once
        self.rcv_nxt = rcv_nxt
        self._mark_rx(now)
        self.stats.bytes_received += delivered
        if not self._readable_signalled:
            self._readable_signalled = True
            self.events.append(TcpEvent.READABLE)
        # Delayed ACK (RFC 1122 4.2.3.2, RFC 5681 4.2): at least every second
        # full-sized segment -- a GSO super-packet counts as many.
        self._rcv_unacked_segs += 1 + plen // max(self.config.mss, 1)
        if self.config.delayed_ack is None or self._rcv_unacked_segs >= 2:
            self._ack_now = True
        elif self.delack_deadline is None:
            self.delack_deadline = now + self.config.delayed_ack
        if self._peer_fin_seq is not None and self._peer_fin_seq == rcv_nxt:
            return FIN
        return fin

    def _receive_fin(self, now: float) -> None:
        """RFC 9293 3.10.7.4 eighth step."""
        st = self.state
        if st not in (SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2):
            self._ack_now = True
            return
        self._peer_fin_seq = None
        self.rcv_nxt = (self.rcv_nxt + 1) & MASK
        self._mark_rx(now)
        self._ack_now = True
        self.events.append(TcpEvent.PEER_CLOSED)
        if st is ESTABLISHED or st is SYN_RECEIVED:
            self.state = CLOSE_WAIT
        elif st is FIN_WAIT_1:
            if self._fin_requested and self.snd_una == ((self._fin_seq + 1) & MASK):
                self._enter_time_wait(now)
            else:
                self.state = CLOSING  # simultaneous close (RFC 9293 Figure 13)
        else:
            self._enter_time_wait(now)

    def _on_reset(self) -> None:
        """An acceptable RST (RFC 9293 3.10.7.4 second step)."""
        st = self.state
        if st is SYN_RECEIVED:
            # Passive open: back to LISTEN, i.e. the listener forgets us;
            # active (simultaneous) open: connection refused.
            self._enter_closed(None if self.parent is not None else TcpEvent.REFUSED)
        elif st in (ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT):
            self._enter_closed(TcpEvent.RESET)
        else:
            self._enter_closed(None)

    def _challenge_ack(self, now: float) -> None:
        # RFC 5961 3.2 / 4.2 / 5.2: <SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK>,
        # within a budget per second (RFC 5961 7): a flood of forged RSTs
        # or SYNs must not turn into a flood of ACKs from us.
        limit = self.config.challenge_ack_limit
        if limit is not None:
            if now - self.challenge_since >= 1.0 or now < self.challenge_since:
                self.challenge_since = now
                self.challenge_sent = 0
            if self.challenge_sent >= limit:
                self.stats.challenge_acks_suppressed += 1
                return
            self.challenge_sent += 1
        self.stats.challenge_acks += 1
        self._ack_now = True

    def _enter_time_wait(self, now: float) -> None:
        self.state = TIME_WAIT
        self.rto_deadline = self.persist_deadline = self.delack_deadline = None
        self.timewait_deadline = now + 2 * self.config.msl
        self._ack_now = True

    def _enter_closed(self, event: TcpEvent | None) -> None:
        was_embryonic = self.state is SYN_RECEIVED
        self.state = CLOSED
        self.rto_deadline = self.delack_deadline = None
        self.persist_deadline = self.timewait_deadline = None
        self._ack_now = False
        if event is not None:
            self.events.append(event)
        self.events.append(TcpEvent.CLOSED)
        if self.parent is not None and was_embryonic:
            self.parent.child_closed(self)

    # -------------------------------------------------------------- output

    def poll_output(self, now: float) -> list[TcpSegment]:
        """Everything to send now, oldest first; empty when there is nothing."""
        out = self._out
        self._out = []
        st = self.state
        held = False
        if self.config.min_ack_delay and st is not SYN_SENT:
            ack = self._ack_value(now)
            # Nothing that carries an ACK leaves before the SYN may be acked;
            # a pure ACK that acknowledges nothing new waits for the timer.
            held = ack is None or (ack == self.last_ack_sent and ack != self.rcv_nxt)
            if ack is None:
                self.stats.segments_sent += len(out)
                return out  # RSTs only
        if st is SYN_SENT or st is SYN_RECEIVED:
            if self.snd_nxt == self.iss:
                out.append(self._syn_segment(now))
        elif st in _SENDING:
            self._output_data(now, out)
        if held and self._ack_now:
            self._ack_now = False
        if self._ack_now and st is not CLOSED and st is not SYN_SENT:
            # A pure ACK carries SND.MAX, not SND.NXT: during go-back-N SND.NXT
            # is left of the peer's RCV.NXT and the ACK would be unacceptable
            # there (BSD tcp_output does the same).  RSTs use SND.MAX too.
            out.append(self._make(self.snd_max, ACK, b"", now))
        self.stats.segments_sent += len(out)
        self._arm_tlp()
        return out

    def _arm_tlp(self) -> None:
        """RFC 8985 7.2: schedule a tail loss probe 2 SRTT after data or an ACK last moved.

        Only with SACK (what the probe's ACK says is what makes it useful),
        outside recovery, with data outstanding, one probe per tail, and
        only when it would come before the RTO.  A lone segment in flight
        may wait for the receiver's delayed ACK first (WCDelAckT, 200 ms),
        except from a frozen TCB: it drains what it owes before its splice
        can relay (thesis 5.1, PRE_SPLICED), and a small last segment is one
        Linux acknowledges only when its delayed-ACK timer fires (40 ms in a
        capture of a pair handed over mid-transfer, the splice stalled
        meanwhile), whereas a duplicate of it is acknowledged at once
        (tcp_data_queue forces an immediate ACK for a retransmission).  So
        its probe comes 2 SRTT after the tail, no earlier than
        FROZEN_PTO_FLOOR: one small duplicate against a stalled splice.
        """
        self.tlp_deadline = None
        srtt = self.rto.srtt
        if (
            srtt is None
            or not self.sack_ok
            or not self.config.sack_recovery
            or self._tlp_out
            or self.cc.in_recovery
            or self.state not in _SENDING
            or self.snd_una == self.snd_max
            or self.rto_deadline is None
        ):
            return
        pto = 2 * srtt
        if self.frozen:
            pto = max(pto, FROZEN_PTO_FLOOR)
        else:
            if seq_sub(self.snd_max, self.snd_una) <= self.snd_mss:
                pto += 0.2
            pto = max(pto, 0.01)
        deadline = self._tlp_ref + pto
        if deadline < self.rto_deadline:
            self.tlp_deadline = deadline

    def _on_pto(self, now: float) -> None:
        """RFC 8985 7.3: send one probe, new data if allowed, else the last segment again.

        The probe's ACK either acknowledges everything (only ACKs were
        lost) or carries SACK blocks that start recovery (with Limited
        Transmit's help) instead of the RTO.
        """
        if self.cc.in_recovery or self.snd_una == self.snd_max or self.state not in _SENDING:
            return
        self._tlp_out = True
        self.stats.tlp_probes += 1
        buf = self.send_buf
        unsent = len(buf) - seq_sub(self.snd_nxt, buf.seq)
        if (
            unsent > 0
            and self.snd_nxt == self.snd_max
            and seq_sub(self.snd_max, self.snd_una) + self.snd_mss <= self.snd_wnd
        ):
            self._tlp_extra = self.snd_mss  # the next _output_data sends it
            self._force_send = True
        else:
            n = min(self.snd_mss, seq_sub(self.snd_max, self.snd_una))
            start = (self.snd_max - n) & MASK
            data_off = seq_sub(start, buf.seq)
            n = min(n, len(buf) - data_off)
            if n <= 0:
                return  # only a FIN outstanding: the RTO resends it
            self.stats.retransmits += 1
            self.stats.retransmitted_bytes += n
            self._rtt_seq = None
            self._out.append(self._make(start, ACK, buf.peek(data_off, n), now))
        self.rto_deadline = now + self.rto.current()  # RFC 8985 7.3: re-arm the RTO

    def _syn_segment(self, now: float) -> TcpSegment:
        c = self.config
        opts = TcpOptions(mss=c.mss)
        window = min(self.recv_buf.free(), 0xFFFF)  # RFC 7323 2.2: unscaled in a SYN
        if self.state is SYN_SENT:
            flags = SYN
            # RFC 3168 6.1.1: request ECN (ECE and CWR) on the first SYN only;
            # 6.1.1.1 lets a retransmission go without, in case a middlebox
            # drops ECN-setup SYNs (Linux's tcp_ecn_fallback does the same).
            self._ecn_requested = c.ecn and self.snd_max == self.iss
            if self._ecn_requested:
                flags |= ECE | CWR
            opts.wscale = c.rcv_wscale
            opts.sack_permitted = c.sack
            if c.timestamps:
                opts.timestamp = (self.ts_now(now), 0)
            ack = 0
        else:
            # RFC 7323 1.3 / RFC 2018 2: answer only options the peer offered.
            flags = SYN | ACK
            if self.ecn_ok:
                flags |= ECE  # RFC 3168 6.1.1: ECN-setup SYN-ACK (ECE, not CWR)
            if self.wscale_ok:
                opts.wscale = self.rcv_wscale
            opts.sack_permitted = self.sack_ok
            if self.ts_ok:
                opts.timestamp = (self.ts_now(now), self.ts_recent)
            ack = self.rcv_nxt
            self.rcv_adv = (self.rcv_nxt + window) & MASK
            self.last_ack_sent = ack
            self._ack_now = False
        if self.snd_max != self.iss:
            self.stats.retransmits += 1
        elif self._rtt_seq is None:
            self._rtt_seq = (self.iss + 1) & MASK
            self._rtt_time = now
        self.snd_nxt = self.snd_max = (self.iss + 1) & MASK
        if self.rto_deadline is None:
            self.rto_deadline = now + self.rto.current()
        return TcpSegment(self.local[1], self.remote[1], self.iss, ack, flags, window, opts)

    def _output_data(self, now: float, out: list[TcpSegment]) -> None:
        buf = self.send_buf
        mss = self.snd_mss
        max_tso = max(self.config.max_tso_bytes // mss, 1) * mss
        # RFC 6675 recovery: the congestion window limits ``pipe``, not the
        # flight; NextSeg's rule (1) (lost holes) goes before new data.
        pipe = self._sack_resend(now, out, lost_only=True) if self.cc.sack_recovery else None
        # RFC 3042 Limited Transmit: the first two duplicate ACKs each let one
        # new segment out beyond cwnd, so that a window of a few segments
        # still yields the third duplicate (else every loss waits for an RTO).
        cwnd = self.cc.cwnd + self._tlp_extra
        self._tlp_extra = 0
        if not self.cc.in_recovery:
            cwnd += min(self.cc.dupacks, DUP_THRESH - 1) * mss
        while True:
            off = seq_sub(self.snd_nxt, buf.seq)
            avail = len(buf) - off
            flight = seq_sub(self.snd_nxt, self.snd_una)
            usable = min(self.snd_wnd - flight, cwnd - (flight if pipe is None else pipe))
            if avail <= 0:
                if self._fin_requested and self.snd_nxt == self._fin_seq:
                    out.append(self._send_data(self.snd_nxt, b"", FIN | ACK, now))
                break
            if usable <= 0:
                if flight == 0:
                    self._arm_persist(now)  # RFC 9293 3.8.6.1: zero window
                break
            n = min(avail, usable, max_tso)
            if n < avail and n < mss and n < self.max_snd_wnd // 2 and not self._force_send:
                # RFC 1122 4.2.3.4 sender SWS avoidance: wait for a useful window.
                if flight == 0:
                    self._arm_persist(now)
                break
            self._force_send = False
            if mss < n < avail:
                n -= n % mss  # whole MSS pieces for GSO; the rest goes next
            flags = ACK
            if n == avail:
                flags |= PSH
                if self._fin_requested:
                    flags |= FIN  # piggyback the FIN on the last data
            out.append(self._send_data(self.snd_nxt, buf.peek(off, n), flags, now))
            if pipe is not None:
                pipe += n
        if pipe is not None:
            self._sack_resend(now, out, lost_only=False)  # NextSeg rule (3)

    def _sack_resend(self, now: float, out: list[TcpSegment], lost_only: bool) -> int:
        """RFC 6675 5 (C): resend scoreboard holes while cwnd - pipe >= SMSS; the pipe after.

        ``lost_only``: NextSeg rule (1), holes IsLost() says are lost; else
        rule (3), any unSACKed range below the highest SACK not yet resent.
        """
        board = self._sack
        una = self.snd_una
        flight = seq_sub(self.snd_max, una)
        high = seq_sub(self._high_rxt, una) if seq_gt(self._high_rxt, una) else 0
        mss = self.snd_mss
        if board is None:
            return flight
        pipe = board.pipe(flight, high, mss)
        buf = self.send_buf
        while lost_only and self._relost and self.cc.cwnd - pipe >= mss:
            start, end = self._relost.pop(0)
            if seq_le(end, una):
                continue
            start = start if seq_gt(start, una) else una
            n = min(
                seq_sub(end, start), self.config.max_tso_bytes, len(buf) - seq_sub(start, buf.seq)
            )
            if n > 0:
                pipe += self._resend(start, n, now, out)
        while (room := self.cc.cwnd - pipe) >= mss:
            # A hole goes out in as few segments as the window allows: with
            # GSO one super-packet, cut at the MSS by the kernel, so that a
            # lost hole is not resent as dozens of packets each as likely
            # to be lost again (a lost retransmission costs an RTO).
            limit = min(room, self.config.max_tso_bytes) // mss * mss
            if lost_only:
                nxt = board.next_retransmit(high, mss, limit)
            else:
                nxt = board.next_unsacked(high, mss, limit)
            if nxt is None:
                break
            off, n = nxt
            start = (una + off) & MASK
            data_off = seq_sub(start, buf.seq)
            n = max(min(n, len(buf) - data_off), 0)
            if n == 0:
                break  # only the FIN is left there: _retransmit_first's business
            pipe += self._resend(start, n, now, out)
            high = off + n
            self._high_rxt = (una + high) & MASK
        return pipe

    def _resend(self, start: int, n: int, now: float, out: list[TcpSegment]) -> int:
        """Send [start, start + n) again in this recovery; ``n``."""
        buf = self.send_buf
        self.stats.retransmits += 1
        self.stats.retransmitted_bytes += n
        self.stats.sack_retransmits += 1
        self._rtt_seq = None  # Karn's rule (RFC 6298 3)
        out.append(self._make(start, ACK, buf.peek(seq_sub(start, buf.seq), n), now))
        self._rxt_marks.append((start, (start + n) & MASK, self.snd_max))
        return n

    def _find_lost_retransmissions(self) -> None:
        """A retransmission is lost when data sent after it is SACKed while it is not.

        RFC 6675 alone finds a lost retransmission only by the RTO; this
        is RACK's rule (RFC 8985 6.2) by transmission order instead of
        time, with no reordering window: the receiver got bytes sent after
        the retransmission, which still left a hole.  Its range goes to
        ``_relost``, resent first by NextSeg's rule (1).
        """
        board = self._sack
        if board is None or not board.blocks:
            return
        una = self.snd_una
        top = (una + board.highest) & MASK  # the end of the highest SACKed byte
        keep: list[tuple[int, int, int]] = []
        for start, end, sent_max in self._rxt_marks:
            if seq_le(end, una):
                continue  # acknowledged
            if not seq_gt(top, sent_max):
                keep.append((start, end, sent_max))
                continue
            lo = seq_sub(start, una) if seq_gt(start, una) else 0
            for a, b in board.unsacked_in(lo, seq_sub(end, una)):
                self._relost.append(((una + a) & MASK, (una + b) & MASK))
                self.stats.lost_retransmits += 1
        self._rxt_marks = keep

    def _send_data(self, seq: int, payload: bytes, flags: int, now: float) -> TcpSegment:
        n = len(payload)
        end = (seq + n + (1 if flags & FIN else 0)) & MASK
        if seq_lt(seq, self.snd_max):
            self.stats.retransmits += 1
            self.stats.retransmitted_bytes += min(n, seq_sub(self.snd_max, seq))
            self._rtt_seq = None  # Karn's rule (RFC 6298 3)
            if seq_gt(end, self.snd_max):
                self.stats.bytes_sent += seq_sub(end, self.snd_max)
        else:
            self.stats.bytes_sent += n
            if self._rtt_seq is None:
                self._rtt_seq = end
                self._rtt_time = now
        self.snd_nxt = end
        self._tlp_ref = now
        new_data = n and not seq_lt(seq, self.snd_max)
        if seq_gt(end, self.snd_max):
            self.snd_max = end
        if self.rto_deadline is None:
            self.rto_deadline = now + self.rto.current()  # RFC 6298 5.1
        if new_data and self.ecn_ok and self._cwr_pending:
            flags |= CWR  # RFC 3168 6.1.2: the first new data after the reduction
            self._cwr_pending = False
        seg = self._make(seq, flags, payload, now)
        if new_data and self.ecn_ok:
            # RFC 3168 6.1.4/6.1.5: ECT on new data only, never on pure ACKs,
            # window probes or retransmissions.
            seg.ecn = ECN_ECT0
        return seg

    def _retransmit_first(self, now: float) -> None:
        """Send the first unacknowledged segment again (fast retransmit, partial ACK)."""
        buf = self.send_buf
        off = seq_sub(self.snd_una, buf.seq)
        n = min(self.snd_mss, len(buf) - off)
        flags = ACK
        if n <= 0:
            if not (self._fin_requested and self.snd_una == self._fin_seq):
                return
            n = 0
            flags |= FIN
        elif n == len(buf) - off and self._fin_requested and seq_gt(self.snd_max, self._fin_seq):
            flags |= FIN
        payload = buf.peek(off, n) if n else b""
        self.stats.retransmits += 1
        self.stats.retransmitted_bytes += n
        self._rtt_seq = None
        self._out.append(self._make(self.snd_una, flags, payload, now))
        self.rto_deadline = now + self.rto.current()

    def _make(self, seq: int, flags: int, payload: bytes, now: float | None) -> TcpSegment:
        """Build a segment of this connection; every ACK-bearing one carries our window."""
        opts = TcpOptions()
        if flags & RST:
            return TcpSegment(self.local[1], self.remote[1], seq, 0, flags, 0, opts)
        if self._ece_pending and flags & ACK:
            flags |= ECE
        if self.ts_ok and now is not None:
            opts.timestamp = (self._tsval(now), self.ts_recent)
        if self.sack_ok and self.ooo:
            opts.sack_blocks = self.ooo.sack_blocks(3 if self.ts_ok else 4)
        ack = self.rcv_nxt
        if self.config.min_ack_delay and now is not None:
            allowed = self._ack_value(now)
            if allowed is not None:
                ack = allowed
        self.last_ack_sent = ack
        self._ack_now = False
        self._rcv_unacked_segs = 0
        self.delack_deadline = None
        return TcpSegment(
            self.local[1], self.remote[1], seq, ack, flags, self._window_field(ack), opts, payload
        )

    def _window_field(self, ack: int) -> int:
        """The 16-bit window to advertise with ``ack``, moving ``rcv_adv`` (RFC 9293 3.8.6.2.2).

        ``ack`` is RCV.NXT unless min_ack_delay holds it back; the window is
        then counted from it, so the right edge is the same either way.
        """
        shift = self.rcv_wscale
        cur = max(seq_sub(self.rcv_adv, self.rcv_nxt), 0)
        free = min(self.recv_buf.free(), 0xFFFF << shift)
        cap = self.recv_buf.capacity
        # RFC 1122 4.2.3.3: move the right edge only by a useful amount.
        wnd = free if free - cur >= min(cap // 2, self.config.mss) else cur
        lag = seq_sub(self.rcv_nxt, ack)
        field_ = (wnd + lag) >> shift
        if (field_ << shift) < cur + lag:
            field_ += 1  # rounding must never move the right edge left
        field_ = min(field_, 0xFFFF)
        self.rcv_adv = (ack + (field_ << shift)) & MASK
        return field_

    def _mark_rx(self, now: float) -> None:
        """RCV.NXT moved at ``now``: with min_ack_delay, remember when it may be acked."""
        if self.config.min_ack_delay:
            self._rx_marks.append((now, self.rcv_nxt))

    def _ack_value(self, now: float) -> int | None:
        """The highest RCV.NXT received at least min_ack_delay ago (None: none yet)."""
        marks = self._rx_marks
        due = now - self.config.min_ack_delay
        while marks and marks[0][0] <= due:
            self._ack_allowed = marks.popleft()[1]
        return self._ack_allowed

    def _tsval(self, now: float) -> int:
        """The TSval of a segment sent now: never below one already sent (RFC 7323 5.4).

        The event loop hands the TCB the ``now`` of whatever woke it, and a
        timer's may be newer than the one the next pass over dirty
        connections uses; the peer's PAWS check must never see the clock
        step back.
        """
        t = self.ts_now(now)
        cap = self.ts_cap
        if cap is not None and seq_gt(t, cap):
            t = cap  # RFC 7323 5.4 asks only that the clock never go back
        last = self._ts_sent
        if last is not None and seq_lt(t, last):
            return last
        self._ts_sent = t
        return t

    def ts_now(self, now: float) -> int:
        """The TSval this connection would send at ``now``."""
        # RFC 7323 5.4: a 1 ms clock with a random per-connection offset.
        return (int(now * 1000) + self.ts_offset) & MASK
