"""The splice relay: one object per splice, from intend_splice until it is forgotten.

Read first: thesis 4.1 (the API: intend_splice, splice(len)), 5.1 and
Fig. 5.1 (daemon/splice/state.py), 5.2-5.4 (daemon/splice/translator.py),
and the base points of daemon/splice/session.py.

Theory of operation
-------------------
``Relay`` is sans-I/O, like the TCP code: it is driven by calls that carry
the time and answers with a list of *actions* for the I/O shell
(daemon/io/splicer.py) to carry out.  It never reads a clock, a socket or
the TUN, so every rule below is unit-tested from golden packets without
root (tests/test_splice_relay.py).

``intend_splice`` (thesis 4.1) creates the relay with the client TCB; the
proxy's reads of the client stop (the shell holds them back).  The server
TCB joins when its connect completes (Fig. 5.1 CLOSE -> ESTABLISHED).

``splice(len)`` *freezes* both TCBs (``TcpConnection.freeze``): from then on
segments of either connection come here, not to the TCBs.  Bytes the TCBs
had received but the proxy never read cross over as ordinary data: the
client's go out through the server TCB, the server's through the client TCB
after the ``len`` bytes the proxy still writes (the SOCKS reply).  Each TCB
is fed only the acknowledgment part of incoming segments
(``TcpConnection.on_ack``) until everything it sent is acknowledged; then it
falls silent, is dropped, and its interface goes PRE_SPLICED -> SPLICED,
which fixes that side's base point and flushes the segments queued toward
it.  From then on a segment costs one ``peek``, ``translate`` (a rewrite of
the headers in the read buffer) and one write.

Once both interfaces relay, the relay asks for the *fast path*
(``InstallFastPath``): the same two translations go into a BPF map and the
kernel rewrites and forwards the steady state (daemon/fastpath).  What the
program does not handle (SYN, FIN, RST, unusual options) still arrives here
and is relayed by ``translate``, so Fig. 5.1 stays in Python.  The program
must let the daemon see the ACK of a FIN relayed toward a side
(FIN_RELAYED -> SHUTDOWN): ``WatchFinAck`` asks it to pass up any segment
from that side acknowledging it, and clears the watch once seen.

Teardown follows Fig. 5.1: a relayed FIN and its ACK give FIN_RELAYED then
SHUTDOWN per interface, both SHUTDOWN give TIMEWAIT (``ArmTimewait``), and
2MSL later the pair is forgotten (``TearDown``), after which segments of
either connection get a RST from the daemon (RFC 9293 3.10.7.1).  A RST
from either side is relayed and tears the splice down at once.  A new SYN on
the client's 4-tuple during TIMEWAIT ends the wait (RFC 9293 3.10.7.4 /
RFC 6191) and is the shell's to handle as a new connection (``Reopen``).

Bounded splice (beyond the thesis: the asymmetric splice its 7.1 leaves as
future work).  ``splice(..., limits=(toward_client, toward_server))`` relays
exactly that many bytes of each peer's stream, counted from the splice
(bytes that crossed over at the freeze included), then hands both
connections back.  The TCBs are not dropped when they fall silent but
*parked*.  A segment that crosses its direction's limit is relayed cut at
the limit (FIN cleared; a segment wholly beyond it as a pure ACK at the
limit, so its acknowledgment still reaches the other peer) and held whole
for its own connection's TCB; a FIN before the limit moves the limit to it
and is held too, so a bounded splice never relays a FIN.  Once a peer
acknowledges the last byte relayed toward it, that interface is
LIMIT_REACHED; both give the hand-back (``HandBack``): each parked TCB is
thawed with its sequence spaces advanced by what was relayed
(``TcpConnection.thaw``), and the shell feeds it the held segments through
its ordinary input, so the bytes beyond a limit reach the proxy like any
others.  Held bytes were never acknowledged to their sender, so dropping
them (the queue limit) is always safe: the sender retransmits.

A bounded splice may go to the kernel fast path like any other, with the
limit of each direction in its map entry: the kernel relays what lies
wholly before it and sends the rest up (the segment that reaches the
limit is cut here), and it passes up the ACK of the last byte before the
limit like the ACK of a relayed FIN (``WatchFinAck``), so the hand-back is
decided here.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from daemon.splice.family import to_ipv6, to_relay_shape
from daemon.splice.session import Side, translators
from daemon.splice.state import QUEUEING_STATES, Event, Iface, SplicePair, SpliceState
from daemon.splice.translator import SegmentInfo, Translator, TsMode, peek, translate
from daemon.tcp.config import Endpoint, TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.events import TcpEvent
from daemon.tcp.reassembly import ReassemblyQueue
from daemon.tcp.seq import seq_ge, seq_gt, seq_lt, seq_sub
from daemon.tcp.state import TcpState
from daemon.wire.checksum import internet_checksum, pseudo_header_sum
from daemon.wire.icmp import MIN_IPV6_MTU, frag_needed, packet_too_big
from daemon.wire.tcp import ACK, FIN, RST, SYN, TcpSegment
from daemon.wire.tcp_options import find_timestamp
from daemon.wire.vnet import VnetHeader

__all__ = [
    "Action",
    "ArmTimer",
    "ArmTimewait",
    "Emit",
    "FlowKey",
    "HandBack",
    "InstallFastPath",
    "ProxyMisuse",
    "Relay",
    "RelayCounters",
    "RelaySide",
    "Reopen",
    "TapData",
    "TapEnd",
    "TearDown",
    "WatchFinAck",
    "Write",
]

MASK = 0xFFFFFFFF
QUEUE_LIMIT = 8 << 20  # bytes of segments held per splice while a side drains
TAP_WINDOW = 16 << 20  # bytes ahead of the tap's next byte it reassembles
CLIENT, SERVER = Iface.CLIENT, Iface.SERVER
BOUNDED = SpliceState.BOUNDED

# (source address, source port, destination address, destination port) of
# the segments that *arrive* on one connection: the fast path's map key.
FlowKey = tuple[bytes, int, bytes, int]


# ----------------------------------------------------------------- actions


class Write(NamedTuple):
    """A relayed packet for the TUN (virtio header in offload mode)."""

    vnet: bytes | None
    packet: memoryview | bytearray


class Emit(NamedTuple):
    """Segments a draining TCB sends on its own connection."""

    iface: Iface
    tcb: TcpConnection
    segments: list[TcpSegment]


class ArmTimer(NamedTuple):
    """(Re)arm or, with None, cancel the retransmission timer of a draining TCB."""

    iface: Iface
    deadline: float | None


class ArmTimewait(NamedTuple):
    deadline: float


class TearDown(NamedTuple):
    """Forget the splice: free both connections, remove any fast path entries."""


class Reopen(NamedTuple):
    """The segment opens a new connection on the client's 4-tuple: handle it as such."""


class InstallFastPath(NamedTuple):
    """Both directions relay: the steady state may leave for the kernel.

    ``entries`` are (key of the arriving segments, translator, ACK to watch
    for or None, limit or None), one per direction: the watch is the ACK of
    a relayed FIN, or of the last byte of a bounded splice's limit; the
    limit is where a bounded direction stops (the kernel relays only what
    lies wholly before it, the daemon cuts the rest).
    """

    entries: tuple[tuple[FlowKey, Translator, int | None, int | None], ...]


class WatchFinAck(NamedTuple):
    """Pass up segments with key ``key`` that acknowledge ``fin_ack`` (None: stop)."""

    key: FlowKey
    fin_ack: int | None


class HandBack(NamedTuple):
    """A bounded splice is over: both TCBs resume; the proxy has its conns again.

    ``returned`` are bytes each side's peer sent that the proxy must read
    first (they crossed over at the freeze beyond the limit); ``held`` the
    raw segments that arrived beyond the limit, for the shell's ordinary
    input (vnet header bytes or None, packet), per side in arrival order;
    ``relayed`` the (client -> server, server -> client) byte counts: every
    byte of each stream this splice carried (crossed at the freeze or relayed).
    """

    returned: dict[Iface, bytes]
    held: dict[Iface, list[tuple[bytes | None, bytes]]]
    relayed: tuple[int, int]


class TapData(NamedTuple):
    """The next bytes of the server's stream toward the client, for the tap (in order)."""

    data: bytes


class TapEnd(NamedTuple):
    """The tap has everything it will get (hand-back or the server's FIN)."""


class ProxyMisuse(NamedTuple):
    """The proxy broke a thesis 4.1 rule; its bytes were discarded."""

    iface: Iface
    message: str


Action = (
    Write
    | Emit
    | ArmTimer
    | ArmTimewait
    | TearDown
    | Reopen
    | InstallFastPath
    | WatchFinAck
    | ProxyMisuse
    | HandBack
    | TapData
    | TapEnd
)


@dataclass(slots=True)
class RelayCounters:
    """Daemon-wide relay counters, shared by every Relay (``stats``)."""

    spliced: int = 0
    relayed: int = 0
    queued: int = 0
    queue_drops: int = 0
    relay_malformed: int = 0
    resets_relayed: int = 0
    torn_down: int = 0
    timewait_reopened: int = 0
    fast_path_installed: int = 0
    compacted: int = 0  # splices whose connection records the daemon dropped
    adopted: int = 0  # splices taken over from a dead daemon's fast path map
    slept: int = 0  # compact splices whose relay was dropped (the map entries are it)
    woken: int = 0  # dormant splices given a relay again by a punted segment
    bounded: int = 0  # splices bounded by a byte count (a subset of ``spliced``)
    handed_back: int = 0  # bounded splices that returned their conns to the proxy
    held_segments: int = 0  # segments beyond a limit, kept for the resuming TCB
    tapped: int = 0  # splices with a TCP tap
    tapped_bytes: int = 0  # bytes given to taps
    kernel_sockets: int = 0  # splices of two kernel connections taken over (splice_sockets)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


# ------------------------------------------------------------------- sides


class _SealedDeque(deque):  # type: ignore[type-arg]
    """An empty deque that refuses to grow: the outbox and queue of a sealed side.

    A relaying side never queues or takes proxy bytes again, and an empty
    deque costs ~600 bytes; every sealed side shares this one instance.
    Growing it would be a bug, so it raises instead of dropping the data.
    """

    __slots__ = ()

    def _refuse(self, *_args: object) -> None:
        raise RuntimeError("a sealed splice side queues nothing (Relay.seal)")

    append = appendleft = extend = extendleft = insert = _refuse


_SEALED: deque = _SealedDeque()  # type: ignore[type-arg]


@dataclass(slots=True, eq=False)
class RelaySide:
    """One connection of the splice, as the relay sees it."""

    iface: Iface
    local: Endpoint
    remote: Endpoint
    # The daemon's TCB on this connection until it falls silent (then None).
    tcb: TcpConnection | None
    # Bytes this TCB still has to send after splice(), then maybe a FIN.
    outbox: deque[bytes] = field(default_factory=deque)
    outbox_fin: bool = False
    fin_queued: bool = False
    base: Side | None = None  # base points, from splice() on
    # Segments waiting to be relayed toward this side (it is not SPLICED yet).
    queue: deque[tuple[bytes | None, bytes]] = field(default_factory=deque)
    # Where the FIN relayed toward this side ends, in this connection's space.
    fin_ack: int | None = None
    misuse_reported: bool = False  # the proxy broke a 4.1 rule on this fd (said once)
    # Bounded splice only.  ``stop``: where relaying toward this side ends,
    # in the *other* connection's receive space (its base irs + the limit
    # left after the freeze; a FIN before it moves it there).
    stop: int | None = None
    parked: TcpConnection | None = None  # the silent TCB, resumed at the hand-back
    returned: bytes = b""  # this side's peer's bytes beyond the limit at the freeze
    held: list[tuple[bytes | None, bytes]] | None = None  # segments beyond the limit
    # The latest from this side's peer, for the TCB that resumes: its
    # acknowledgment, (window field, seq, ack) and TSval.
    peer_ack: int | None = None
    peer_window: tuple[int, int, int] | None = None
    peer_tsval: int | None = None
    # The right edge of the window the relay offered this side's peer (in
    # its sequence space), from the other side's relayed ACKs: the TCB that
    # resumes accepts up to there, since the peer may send up to there.
    offered_edge: int | None = None

    @property
    def key(self) -> FlowKey:
        """The 4-tuple of segments arriving on this connection."""
        return (self.remote[0], self.remote[1], self.local[0], self.local[1])


@dataclass(slots=True, eq=False)
class Tap:
    """A TCP tap on the server -> client direction (thesis 4.4)."""

    next: int  # the server's sequence number of the next byte the tap wants
    ooo: ReassemblyQueue = field(default_factory=ReassemblyQueue)
    copied: int = 0
    ended: bool = False
    fin_at: int | None = None  # where the server's FIN is (it may come before a hole fills)


# ------------------------------------------------------------------- relay


@dataclass(slots=True, eq=False)
class Relay:
    """One splice (thesis 4.1, 5.1): both interfaces, their base points, queues, counters."""

    owner: int
    server_id: int  # the server side's API id, handed out by intend_splice
    # Options derived from the client (thesis 5.4), for connecting the
    # server side; None once sealed (no connect can come any more).
    server_config: TcpConfig | None
    client: RelaySide
    msl: float
    offload: bool
    counters: RelayCounters
    server: RelaySide | None = None
    pair: SplicePair = field(default_factory=SplicePair)
    reclaimed: bytes = b""  # taken from the client TCB for the proxy, never delivered
    reclaimed_server: bytes = b""  # the same of a paired server conn (intend with server)
    # Client side after splice(): the proxy's announced bytes still to come,
    # then the server's early bytes (and FIN) that cross to the client.
    len_remaining: int = 0
    early_s2c: bytes | None = None
    early_s2c_fin: bool = False
    proxy_discarded: int = 0
    c2s: Translator | None = None
    s2c: Translator | None = None
    queued_bytes: int = 0
    queue_drops: int = 0
    bytes_c2s: int = 0
    bytes_s2c: int = 0
    packets_c2s: int = 0
    packets_s2c: int = 0
    spliced_at: float | None = None
    fast_path: bool = False  # InstallFastPath was asked for
    bounded: bool = False  # splice() had limits: the hand-back comes after them
    crossed: tuple[int, int] = (0, 0)  # bounded: bytes each way that crossed at the freeze
    tap: Tap | None = None

    @classmethod
    def intend(
        cls,
        owner: int,
        client_tcb: TcpConnection,
        server_id: int,
        connect_config: TcpConfig,
        *,
        msl: float,
        offload: bool,
        counters: RelayCounters,
        max_ack_delay: float = 0.25,
    ) -> Relay:
        """Thesis 4.1 intend_splice: the server side is offered what the client negotiated.

        5.4: MSS clamp = the client's MSS (5.4.4) and receive window scale =
        the client's own (5.4.2), so that segments can later pass between
        them unchanged; timestamps and SACK are offered.

        And the server side acknowledges nothing sooner than the client
        path's RTT (``TcpConfig.min_ack_delay``): the server will carry its
        traffic across both paths, and its congestion control takes its
        minimum RTT from the handshake (BBR keeps it 10 s, Linux's reordering
        window 300 s).  The client TCB's smallest RTT sample is the client
        path at best, so no sample the server takes is smaller than the
        spliced path's; ``max_ack_delay`` bounds it, so that a server that
        speaks first (SSH, SMTP) does not wait on a bad estimate.
        """
        t = client_tcb
        client_rtt = t.rto.min_rtt if t.rto.min_rtt is not None else 0.0
        cfg = replace(
            connect_config,
            mss=t.peer_mss,
            rcv_wscale=t.snd_wscale if t.wscale_ok else None,
            sack=True,
            timestamps=True,
            min_ack_delay=min(client_rtt, max_ack_delay),
        )
        side = RelaySide(CLIENT, t.local, t.remote, t)
        return cls(owner, server_id, cfg, side, msl, offload, counters)

    @classmethod
    def adopt(
        cls,
        server_id: int,
        keys: tuple[FlowKey, FlowKey],
        c2s: Translator,
        s2c: Translator,
        states: tuple[SpliceState, SpliceState],
        fin_acks: tuple[int | None, int | None],
        *,
        msl: float,
        offload: bool,
        counters: RelayCounters,
        now: float,
    ) -> tuple[Relay, list[Action]]:
        """A splice a dead daemon left in the kernel's map, taken over as it stands.

        Only a splice whose both sides relay gets there (the map holds
        nothing else), so what the relay keeps of it after ``seal`` is all
        there is: the two translators, the Fig. 5.1 states, and the ACK a
        FIN_RELAYED side is waiting for.  ``keys``: the 4-tuples of the
        segments arriving from the client and from the server (the
        connections' real addresses, either family).  ``states`` (client,
        server): SPLICED,
        FIN_RELAYED or SHUTDOWN; both SHUTDOWN is TIMEWAIT, whose 2MSL starts
        again here (the dead daemon's timer is lost; waiting longer is the
        safe side of RFC 9293 3.6).  No owner: the proxy that made it is gone.
        """
        c, s = (
            RelaySide(
                iface,
                (key[2], key[3]),
                (key[0], key[1]),
                None,
                outbox=_SEALED,
                queue=_SEALED,
                fin_ack=fin_ack,
            )
            for iface, key, fin_ack in zip((CLIENT, SERVER), keys, fin_acks, strict=True)
        )
        relay = cls(-1, server_id, None, c, msl, offload, counters, server=s)
        relay.c2s, relay.s2c = c2s, s2c
        relay.spliced_at = now
        relay.fast_path = True
        out: list[Action] = []
        if states == (SpliceState.SHUTDOWN, SpliceState.SHUTDOWN):
            relay.pair.client = relay.pair.server = SpliceState.TIMEWAIT
            out.append(ArmTimewait(now + 2 * msl))
        else:
            relay.pair.client, relay.pair.server = states
        return relay, out

    # ------------------------------------------------------------ phases

    @property
    def spliced(self) -> bool:
        """splice() was called: segments of both connections come to the relay."""
        return self.spliced_at is not None

    def side(self, iface: Iface) -> RelaySide:
        if iface is CLIENT:
            return self.client
        assert self.server is not None
        return self.server

    def server_connected(self, tcb: TcpConnection) -> None:
        """The server TCB reached ESTABLISHED (Fig. 5.1 CLOSE -> ESTABLISHED)."""
        self.server = RelaySide(SERVER, tcb.local, tcb.remote, tcb)
        self._handle(SERVER, Event.SERVER_CONNECTED, [], 0.0)

    def connect_failed(self) -> None:
        """The server side did not connect: the proxy may connect it again."""
        self.server = None

    def splice(
        self,
        length: int,
        unread: bytes,
        now: float,
        limits: tuple[int, int] | None = None,
        server_unread: bytes = b"",
        tap: bool = False,
    ) -> list[Action]:
        """Thesis 4.1 splice(len): freeze both TCBs and start the cross-over.

        ``unread`` are bytes the proxy found unread in its client fd.  In
        stream order the client's bytes for the server are: those, the ones
        the shell took out of the TCB for the fd (``reclaimed``), then what
        is still in the TCB.

        ``limits`` (toward the client, toward the server) bound the splice:
        that many bytes of the server's and of the client's stream, from
        here on, then the hand-back (see the module docstring).
        ``server_unread`` is ``unread`` for a paired server conn's fd;
        ``tap`` asks for a TCP tap of the server's stream (module docstring).
        """
        assert self.server is not None and not self.spliced
        ct, st = self.client.tcb, self.server.tcb
        assert ct is not None and st is not None
        r_c = unread + self.reclaimed + ct.freeze()
        r_s = server_unread + self.reclaimed_server + st.freeze()
        self.reclaimed = self.reclaimed_server = b""
        self.client.base = Side.of(ct, now)
        self.server.base = Side.of(st, now)
        # Their clocks stop just short of where the relay's TSvals start (the
        # bases' ts_sent, TS_MARGIN ahead): still running for the first
        # second, as a taken-over kernel socket's clock did for whatever it
        # sent before the daemon disconnected it (session.py, TS_MARGIN).
        ct.ts_cap = (self.client.base.ts_sent - 1) & MASK
        st.ts_cap = (self.server.base.ts_sent - 1) & MASK
        self.spliced_at = now
        event = Event.SPLICE
        if limits is not None:
            to_client, to_server = limits
            self.bounded = True
            event = Event.SPLICE_BOUNDED
            self.counters.bounded += 1
            # Bytes past a limit that crossed at the freeze go back to the
            # proxy at the hand-back, on the conn they came from; a FIN
            # already received stays with its TCB (never relayed).
            r_c, self.client.returned = r_c[:to_server], r_c[to_server:]
            r_s, self.server.returned = r_s[:to_client], r_s[to_client:]
            self.crossed = (len(r_c), len(r_s))
            left_s = 0 if ct.peer_closed else to_server - len(r_c)
            left_c = 0 if st.peer_closed else to_client - len(r_s)
            self.server.stop = (self.client.base.irs + left_s) & MASK
            self.client.stop = (self.server.base.irs + left_c) & MASK
            self.client.held, self.server.held = [], []
        else:
            self.server.outbox_fin = ct.peer_closed  # the client's FIN came before the splice
            self.early_s2c_fin = st.peer_closed
        if r_c:
            self.server.outbox.append(r_c)
        self.len_remaining = length
        self.early_s2c = r_s
        self.counters.spliced += 1
        out: list[Action] = []
        if tap:
            self.tap = Tap(self.server.base.irs)
            self.counters.tapped += 1
            if r_s:
                self.tap.copied += len(r_s)
                self.counters.tapped_bytes += len(r_s)
                out.append(TapData(r_s))
            if st.peer_closed and not self.bounded:
                self._end_tap(out)
        self._handle(CLIENT, event, out, now)
        self._handle(SERVER, event, out, now)
        self._client_progress()
        self._drive(self.client, now, out)
        self._drive(self.server, now, out)
        return out

    # ------------------------------------------------------- proxy bytes

    def on_proxy_data(self, iface: Iface, data: bytes, now: float) -> list[Action]:
        """Bytes the proxy wrote to a spliced connection's fd (thesis 4.1 rules)."""
        out: list[Action] = []
        if iface is CLIENT and self.len_remaining > 0:
            take = data[: self.len_remaining]
            self.client.outbox.append(take)
            self.len_remaining -= len(take)
            data = data[len(take) :]
            self._client_progress()
            self._drive(self.client, now, out)
        if data:
            # Thesis 4.1: writing more than len to the client, or anything to
            # the server, after splice is not allowed.  Never relay it.
            self.proxy_discarded += len(data)
            s = self.side(iface)
            if not s.misuse_reported:
                s.misuse_reported = True
                what = "more than len bytes to the client" if iface is CLIENT else "to the server"
                out.append(
                    ProxyMisuse(iface, f"wrote {what} after splice; the bytes were discarded")
                )
        return out

    def on_proxy_done(self, iface: Iface, now: float) -> list[Action]:
        """The proxy let go of a spliced fd: no more of its len bytes will come."""
        out: list[Action] = []
        if iface is CLIENT and self.len_remaining > 0:
            self.len_remaining = 0
            self._client_progress()
            self._drive(self.client, now, out)
        return out

    def _client_progress(self) -> None:
        """Once the proxy wrote its len bytes, the server's early bytes follow them."""
        if self.len_remaining == 0 and self.early_s2c is not None:
            if self.early_s2c:
                self.client.outbox.append(self.early_s2c)
            self.client.outbox_fin = self.client.outbox_fin or self.early_s2c_fin
            self.early_s2c = None

    # ---------------------------------------------------------- packets

    def on_packet(
        self, src: Iface, vnet: VnetHeader | None, pkt: memoryview, now: float
    ) -> list[Action]:
        """A segment arrived on connection ``src`` after splice(): feed, relay or queue it."""
        if pkt and pkt[0] >> 4 == 6:
            shaped = to_relay_shape(pkt, vnet)
            if shaped is None:
                self.counters.relay_malformed += 1
                return []
            pkt, vnet = shaped
        info = peek(pkt)
        if info is None:
            self.counters.relay_malformed += 1
            return []
        flags = info.flags
        pair = self.pair
        if flags & (SYN | ACK) == SYN and pair.client is SpliceState.TIMEWAIT:
            # RFC 9293 3.10.7.4 / RFC 6191: a new SYN ends TIME-WAIT.  Clients
            # that closed passively reuse their port at once; without this
            # their SYN would be relayed into the dead pair.
            self.counters.timewait_reopened += 1
            out: list[Action] = []
            self._handle(CLIENT, Event.TIMEWAIT_EXPIRED, out, now)
            out.append(Reopen())
            return out
        if flags & RST:
            return self._relay_reset(src, vnet, pkt, info, now)
        out = []
        s = self.client if src is CLIENT else self.server
        assert s is not None
        if self.bounded:
            return self._on_bounded_packet(s, vnet, pkt, info, now)
        # Does this segment acknowledge the FIN relayed toward its sender?
        if (
            s.fin_ack is not None
            and flags & ACK
            and pair.state(src) is SpliceState.FIN_RELAYED
            and seq_ge(info.ack, s.fin_ack)
        ):
            self._handle(src, Event.FIN_ACKED, out, now)
            if self.fast_path:
                out.append(WatchFinAck(s.key, None))
            if pair.client is SpliceState.GONE:
                return out
        tcb = s.tcb
        if tcb is not None and flags & ACK:
            ts = _timestamp(pkt, info) if tcb.ts_ok else None
            tcb.on_ack(info.seq, info.ack, info.window, flags, info.payload_len > 0, ts, now)
            self._drive(s, now, out)
            if pair.client is SpliceState.GONE:
                return out
        dst = src.other
        if pair.relays_toward(dst):
            self._relay(src, vnet, pkt, info, out, now)
        else:
            self._queue(dst, vnet, pkt)
        return out

    def _relay(
        self,
        src: Iface,
        vnet: VnetHeader | None,
        pkt: memoryview,
        info: SegmentInfo,
        out: list[Action],
        now: float,
    ) -> None:
        t = self.c2s if src is CLIENT else self.s2c
        assert t is not None
        if self.bounded:
            d = self.side(src.other)
            stop = d.stop
            cut = self._cut_at_limit(src, vnet, pkt, info)
            if d.stop != stop and self.fast_path and self.pair.state(src.other) is BOUNDED:
                # A FIN before the limit moved it: the kernel must now pass
                # up the ACK of the new last byte.
                out.append(WatchFinAck(d.key, self._limit_ack(d)))
            if cut is None:
                return
            pkt, info = cut
        if src is SERVER and self.tap is not None and not self.tap.ended:
            # Before translate: the payload is the same, but the cut
            # segment is what goes out.
            tap = self.tap
            if info.flags & FIN and not self.bounded:
                tap.fin_at = (info.seq + info.payload_len) & MASK
            if info.payload_len:
                hl = info.ip_header_len + info.tcp_header_len
                self._to_tap(info.seq, pkt[hl : hl + info.payload_len], out)
            if tap.fin_at == tap.next:  # the stream is complete (no hole before the FIN)
                self._end_tap(out)
        if info.flags & FIN and not self.bounded:
            dst = src.other
            if self.pair.state(dst) is SpliceState.SPLICED:
                d = self.side(dst)
                d.fin_ack = (info.seq + t.seq_delta + info.payload_len + 1) & MASK
                self._handle(dst, Event.FIN_RELAYED, out, now)
                if self.fast_path:
                    # Before the FIN leaves: its ACK may come back through
                    # the kernel before the daemon makes another syscall.
                    out.append(WatchFinAck(d.key, d.fin_ack))
        outs = translate(t, vnet, pkt, info)
        if not outs:
            self.counters.relay_malformed += 1
            return
        self._write(src.other, t, outs, out)
        self.counters.relayed += 1
        if src is CLIENT:
            self.bytes_c2s += info.payload_len
            self.packets_c2s += 1
        else:
            self.bytes_s2c += info.payload_len
            self.packets_s2c += 1

    # ------------------------------------------------------------ the tap

    def _to_tap(self, seq: int, payload: memoryview, out: list[Action]) -> None:
        """Give the tap the bytes of this segment it has not had, in order, once."""
        tap = self.tap
        assert tap is not None
        off = seq_sub(seq, tap.next)
        if off > 0:
            # Ahead of a hole (loss or reordering before the relay): the
            # retransmission that fills it may be the only other copy.
            tap.ooo.insert(tap.next, seq, payload, TAP_WINDOW)
            return
        if -off >= len(payload):
            return  # a retransmission of bytes the tap has
        parts = [bytes(payload[-off:])]
        nxt = (tap.next + len(parts[0])) & MASK
        while (ready := tap.ooo.pop_ready(nxt)) is not None:
            parts.append(bytes(ready))
            nxt = (nxt + len(ready)) & MASK
        data = b"".join(parts)
        tap.next = nxt
        tap.copied += len(data)
        self.counters.tapped_bytes += len(data)
        out.append(TapData(data))

    def _end_tap(self, out: list[Action]) -> None:
        if self.tap is not None and not self.tap.ended:
            self.tap.ended = True
            self.tap.ooo = ReassemblyQueue()
            out.append(TapEnd())

    # ----------------------------------------------------- bounded splice

    def _on_bounded_packet(
        self, s: RelaySide, vnet: VnetHeader | None, pkt: memoryview, info: SegmentInfo, now: float
    ) -> list[Action]:
        """A segment of a bounded splice: relayed up to the limit, the rest held."""
        out: list[Action] = []
        flags = info.flags
        # What the TCB resuming on this side must start from (its peer's
        # latest acknowledgment, window and TSval; RFC 9293 3.10.7.4).
        ts = _timestamp(pkt, info)
        if ts is not None:
            s.peer_tsval = ts[0]
        if flags & ACK:
            if s.peer_ack is None or seq_gt(info.ack, s.peer_ack):
                s.peer_ack = info.ack
            s.peer_window = (info.window, info.seq, info.ack)
            self._note_offer(s.iface, info)
        tcb = s.tcb
        if tcb is not None and flags & ACK:
            tcb.on_ack(info.seq, info.ack, info.window, flags, info.payload_len > 0, ts, now)
            self._drive(s, now, out)
            if self.pair.client is SpliceState.GONE:
                return out
        dst = s.iface.other
        if self.pair.relays_toward(dst):
            self._relay(s.iface, vnet, pkt, info, out, now)
        else:
            self._queue(dst, vnet, pkt)
        # Its acknowledgment may complete the limit toward this side; a FIN
        # (held) may have ended the limit toward the other.
        self._check_limit(s, out, now)
        self._check_limit(self.side(dst), out, now)
        return out

    def _note_offer(self, src: Iface, info: SegmentInfo) -> None:
        """Remember the window right edge this segment offers the other side's peer.

        Relayed, its ACK and window tell the other peer it may send up to
        ack + window in its own space.  Once the TCB resumes, it must accept
        that much: the peer keeps the right edge it was offered (RFC 9293
        3.8.6.2.1 forbids shrinking it), and a TCB that took only its own
        buffer's worth would drop the rest of a burst, costing the peer an
        RTO (measured: 200 ms stalls on the next response).
        """
        t = self.c2s if src is CLIENT else self.s2c
        if t is None:
            return  # not relayed: the TCB still speaks for this side
        # Before the reverse direction is spliced, relayed segments carry the
        # fixed ACK of the output TCB (translator.py), with this window.
        ack = t.ack_fixed if t.ack_delta is None else (info.ack + t.ack_delta) & MASK
        field_ = min((info.window << t.wnd_in_shift) >> t.wnd_out_shift, 0xFFFF)
        edge = (ack + (field_ << t.wnd_out_shift)) & MASK
        d = self.side(src.other)
        if d.offered_edge is None or seq_gt(edge, d.offered_edge):
            d.offered_edge = edge

    def _cut_at_limit(
        self, src: Iface, vnet: VnetHeader | None, pkt: memoryview, info: SegmentInfo
    ) -> tuple[memoryview, SegmentInfo] | None:
        """The part of a segment from ``src`` that may be relayed; hold what is beyond.

        Exact to the byte: payload before the limit is relayed, the whole
        segment is held for ``src``'s TCB (which trims what it already has
        when it resumes).  A FIN before the limit moves the limit to it.  A
        segment wholly beyond goes out as a pure ACK at the limit: its
        acknowledgment, window and SACK blocks belong to the other direction,
        and a sequence number past what the receiver expects would make it
        unacceptable (RFC 9293 3.10.7.4), ACK field unread.
        """
        d = self.side(src.other)
        stop = d.stop
        assert stop is not None
        seq, plen, flags = info.seq, info.payload_len, info.flags
        end = (seq + plen) & MASK
        if flags & FIN and seq_lt(end, stop):
            d.stop = stop = end  # the stream ends before the limit: so does the splice
        if not flags & FIN and not seq_gt(end, stop):
            return pkt, info
        if plen or flags & FIN:
            self._hold(self.side(src), vnet, pkt[: info.total])
        keep = max(seq_sub(stop, seq), 0)
        if keep == 0 and not flags & ACK:
            return None
        ihl, hl = info.ip_header_len, info.ip_header_len + info.tcp_header_len
        buf = bytearray(pkt[: hl + keep])
        struct.pack_into("!H", buf, 2, hl + keep)
        buf[ihl + 13] = flags & ~FIN & 0xFF
        if keep == 0:
            struct.pack_into("!I", buf, ihl + 4, stop)
        if not self.offload:
            # Plain mode updates the checksum incrementally over the headers
            # (translator.py): it must be valid for the cut segment first.
            struct.pack_into("!H", buf, ihl + 16, 0)
            pseudo = pseudo_header_sum(bytes(buf[12:16]), bytes(buf[16:20]), 6, hl - ihl + keep)
            struct.pack_into("!H", buf, ihl + 16, internet_checksum(buf[ihl:], pseudo))
        view = memoryview(buf)
        cut = peek(view)
        return None if cut is None else (view, cut)

    def _hold(self, s: RelaySide, vnet: VnetHeader | None, pkt: memoryview) -> None:
        """Keep a segment beyond the limit for ``s``'s TCB (never acknowledged: may drop)."""
        assert s.held is not None
        if self.queued_bytes + len(pkt) > QUEUE_LIMIT:
            self.queue_drops += 1
            self.counters.queue_drops += 1
            return
        s.held.append((None if vnet is None else vnet.to_bytes(), bytes(pkt)))
        self.queued_bytes += len(pkt)
        self.counters.held_segments += 1

    def _limit_ack(self, s: RelaySide) -> int:
        """The ACK from ``s``'s peer that covers the last byte relayed toward it."""
        src = self.side(s.iface.other)
        assert s.base is not None and s.base.iss is not None and src.base is not None
        assert s.stop is not None
        return (s.base.iss + seq_sub(s.stop, src.base.irs)) & MASK

    def _check_limit(self, s: RelaySide, out: list[Action], now: float) -> None:
        """LIMIT_ACKED once ``s``'s peer acknowledged the last byte relayed toward it."""
        if self.pair.state(s.iface) is not BOUNDED:
            return
        if s.peer_ack is not None and seq_ge(s.peer_ack, self._limit_ack(s)):
            self._handle(s.iface, Event.LIMIT_ACKED, out, now)
            if self.fast_path and self.pair.state(s.iface) is SpliceState.LIMIT_REACHED:
                # Its peer's ACKs are the steady state again, until the hand-back.
                out.append(WatchFinAck(s.key, None))

    def _hand_back(self, out: list[Action], now: float) -> None:
        """Both limits acknowledged: resume both TCBs past what was relayed."""
        c, sv = self.client, self.server
        assert sv is not None and c.base is not None and sv.base is not None
        assert c.stop is not None and sv.stop is not None
        c2s = seq_sub(sv.stop, c.base.irs)
        s2c = seq_sub(c.stop, sv.base.irs)
        for side, sent, received, t in ((c, s2c, c2s, self.s2c), (sv, c2s, s2c, self.c2s)):
            tcb = side.parked
            assert tcb is not None
            other = sv if side is c else c
            floor = None
            if t is not None and t.ts_mode is TsMode.MAP and other.peer_tsval is not None:
                floor = (other.peer_tsval + t.tsval_delta) & MASK
            # Held segments replay in arrival order: a ts_recent taken from
            # a later one would make the TCB drop them as old duplicates
            # (RFC 7323 5.3 PAWS); their own processing moves it on.
            first = _timestamp_of(side.held[0][1]) if side.held else None
            tcb.thaw(
                sent=sent,
                received=received,
                peer_window=side.peer_window,
                ts_recent=side.peer_tsval if first is None else first,
                ts_floor=floor,
                rcv_edge=side.offered_edge,
                now=now,
            )
            side.parked = None
        held = {CLIENT: c.held or [], SERVER: sv.held or []}
        returned = {CLIENT: c.returned, SERVER: sv.returned}
        c.held = sv.held = None
        c.returned = sv.returned = b""
        self.queued_bytes = 0
        self.counters.handed_back += 1
        self._end_tap(out)
        moved = (self.crossed[0] + c2s, self.crossed[1] + s2c)
        out.append(HandBack(returned, held, moved))

    def _queue(self, dst: Iface, vnet: VnetHeader | None, pkt: memoryview) -> None:
        if self.queued_bytes + len(pkt) > QUEUE_LIMIT:
            # Like a drop on a congested link: the sender retransmits.
            self.queue_drops += 1
            self.counters.queue_drops += 1
            return
        d = self.side(dst)
        d.queue.append((None if vnet is None else vnet.to_bytes(), bytes(pkt)))
        self.queued_bytes += len(pkt)
        self.counters.queued += 1

    def _flush(self, dst: Iface, out: list[Action], now: float) -> None:
        """Thesis 5.1: the queue toward an interface is relayed once it splices."""
        d = self.side(dst)
        src = dst.other
        q = d.queue
        while q and self.pair.relays_toward(dst):
            hdr, raw = q.popleft()
            self.queued_bytes -= len(raw)
            buf = memoryview(bytearray(raw))
            info = peek(buf)
            if info is None:
                continue
            vnet = VnetHeader.parse(hdr) if hdr is not None else None
            if info.flags & RST:
                out.extend(self._relay_reset(src, vnet, buf, info, now))
                return
            self._relay(src, vnet, buf, info, out, now)

    def _write(
        self,
        dst: Iface,
        t: Translator,
        outs: list[tuple[bytes | None, memoryview | bytearray]],
        out: list[Action],
    ) -> None:
        """Translated packets (by ``t``) out toward ``dst``, in its own family.

        daemon/splice/family.py; the flow label is the translator's, so an
        adopted splice keeps the one its connection started with."""
        d = self.side(dst)
        if len(d.local[0]) == 16:
            for hdr, buf in outs:
                out.append(Write(*to_ipv6(hdr, buf, d.local[0], d.remote[0], t.flow_label)))
        else:
            for hdr, buf in outs:
                out.append(Write(hdr, buf))

    def _relay_reset(
        self,
        src: Iface,
        vnet: VnetHeader | None,
        pkt: memoryview,
        info: SegmentInfo,
        now: float,
    ) -> list[Action]:
        """Thesis 5.1: a RST is relayed and tears the splice down."""
        out: list[Action] = []
        dst = src.other
        t = self.c2s if src is CLIENT else self.s2c
        other = self.server if dst is SERVER else self.client
        if t is not None:
            self._write(dst, t, translate(t, vnet, pkt, info), out)
        elif other is not None and other.tcb is not None:
            # That direction is not spliced yet: its own TCB still speaks for
            # it and resets the peer with its own sequence numbers.
            other.tcb.abort()
            out.append(Emit(dst, other.tcb, other.tcb.poll_output(now)))
        self.counters.resets_relayed += 1
        self._handle(src, Event.RESET, out, now)
        return out

    def frag_needed(self, iface: Iface, seq: int, mtu: int, quoted_len: int) -> bytes | None:
        """RFC 1191 for a spliced flow: the ICMP for the peer whose segment was too big.

        A router on ``iface``'s path answered a segment relayed onto that
        connection (sequence number ``seq`` there) with "fragmentation
        needed".  The segment was the other connection's peer's, so that
        peer must lower its segment size: it gets the same message, from
        the daemon's address on its own connection, quoting the segment as
        it sent it (4-tuple of its connection, ``seq`` mapped back through
        the translation, 5.3), as an ICMPv6 Packet Too Big if its connection
        is IPv6.  Within a family the MTU passes unchanged: the translation
        keeps a segment's length (options are mapped or NOPed in place, IP
        options only removed); across families it moves by the 20 bytes
        between the two headers.  None while ``iface``'s own TCB still sends
        (PRE_SPLICED): then the segment was the TCB's, and the TCB's own
        path MTU discovery answers it (``TcpConnection.on_path_mtu``).
        """
        out = self.side(iface)
        src = self.server if iface is CLIENT else self.client
        t = self.c2s if iface is SERVER else self.s2c
        if out.tcb is not None or src is None or t is None:
            return None
        # Across families the peer's packets are 20 bytes longer (IPv6) or
        # shorter than their image on the constrained link: its MTU is ours
        # plus that difference (and IPv6 never goes under 1280, RFC 8200 5).
        peer6, out6 = len(src.local[0]) == 16, len(out.local[0]) == 16
        mtu += 20 * (peer6 - out6)
        build = packet_too_big if peer6 else frag_needed
        if peer6:
            mtu = max(mtu, MIN_IPV6_MTU)
        quoted_len += 20 * (peer6 - out6)
        return build(
            src.local[0],
            src.remote[0],
            mtu,
            src.remote,
            src.local,
            (seq - t.seq_delta) & MASK,
            quoted_len,
        )

    def abort(self, now: float) -> list[Action]:
        """Reset both connections (a TCB gave up, or the daemon stops)."""
        out: list[Action] = []
        for s in (self.client, self.server):
            if s is not None and s.tcb is not None and s.tcb.state is not TcpState.CLOSED:
                s.tcb.abort()
                out.append(Emit(s.iface, s.tcb, s.tcb.poll_output(now)))
        if self.pair.client is not SpliceState.GONE:
            self._handle(CLIENT, Event.RESET, out, now)
        return out

    # ----------------------------------------------------------- timers

    def on_timer(self, iface: Iface, now: float) -> list[Action]:
        """A draining TCB's retransmission timer fired."""
        s = self.side(iface)
        out: list[Action] = []
        tcb = s.tcb
        if tcb is None:
            return out
        deadline = tcb.next_deadline()
        if deadline is not None and deadline <= now:
            tcb.on_timer(now)
        self._drive(s, now, out)
        return out

    def on_timewait_expired(self, now: float) -> list[Action]:
        out: list[Action] = []
        if self.pair.client is SpliceState.TIMEWAIT:
            self._handle(CLIENT, Event.TIMEWAIT_EXPIRED, out, now)
        return out

    # -------------------------------------------------------- the drain

    def _drive(self, s: RelaySide, now: float, out: list[Action]) -> None:
        """A frozen TCB: feed it from the outbox, take its output, see if it drained."""
        tcb = s.tcb
        if tcb is None or not self.spliced:
            return
        events = tcb.events
        while events:
            ev = events.popleft()
            if ev is TcpEvent.TIMED_OUT or ev is TcpEvent.RESET:
                # The TCB gave up on its peer before draining: the splice
                # cannot complete; reset both sides (thesis 5.1 RST rule).
                segs = tcb.poll_output(now)  # its own RST, if it sent one
                if segs:
                    out.append(Emit(s.iface, tcb, segs))
                out.extend(self.abort(now))
                return
        outbox = s.outbox
        while outbox and tcb.send_space() > 0:
            chunk = outbox[0]
            try:
                n = tcb.send(chunk)
            except BrokenPipeError:
                outbox.clear()
                break
            if n < len(chunk):
                outbox[0] = chunk[n:]
                break
            outbox.popleft()
        if not outbox and s.outbox_fin and not s.fin_queued:
            s.fin_queued = True
            if tcb.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                tcb.shutdown_write()
        segs = tcb.poll_output(now)
        if segs:
            out.append(Emit(s.iface, tcb, segs))
        if self._drained(s, tcb):
            self._fall_silent(s, tcb, now, out)
        else:
            out.append(ArmTimer(s.iface, tcb.next_deadline()))

    def _drained(self, s: RelaySide, tcb: TcpConnection) -> bool:
        if s.outbox or (s.outbox_fin and not s.fin_queued):
            return False
        if s.iface is CLIENT and (self.len_remaining > 0 or self.early_s2c is not None):
            return False
        return tcb.all_acked()

    def _fall_silent(self, s: RelaySide, tcb: TcpConnection, now: float, out: list[Action]) -> None:
        """Thesis 5.1 PRE_SPLICED -> SPLICED: this TCB is done; relay toward its peer."""
        assert s.base is not None and self.client.base is not None
        assert self.server is not None and self.server.base is not None
        s.base.iss = tcb.snd_max
        s.base.snd_mss = tcb.snd_mss
        s.tcb = None
        if self.bounded:
            s.parked = tcb  # resumes at the hand-back
            if s.peer_ack is None or seq_gt(tcb.snd_una, s.peer_ack):
                s.peer_ack = tcb.snd_una
        out.append(ArmTimer(s.iface, None))
        self.c2s, self.s2c = translators(self.client.base, self.server.base, self.offload)
        self._handle(s.iface, Event.WRITE_QUEUE_DRAINED, out, now)
        if s.fin_queued:
            # The FIN of this direction was sent by the TCB itself (it came
            # before the splice) and is acknowledged: already relayed and
            # acked in Fig. 5.1's terms.
            self._handle(s.iface, Event.FIN_RELAYED, out, now)
            self._handle(s.iface, Event.FIN_ACKED, out, now)
        if self.bounded:
            self._check_limit(s, out, now)  # nothing (more) to relay toward it?
            if self.pair.client is SpliceState.ESTABLISHED:
                return  # handed back already
        self._maybe_fast_path(out)

    def _maybe_fast_path(self, out: list[Action]) -> None:
        """Both TCBs are silent and both translations exist: offer the kernel the pair."""
        if self.fast_path or self.c2s is None or self.s2c is None or self.server is None:
            return
        if self.tap is not None and not self.tap.ended:
            return  # the kernel would not copy for the tap
        if self.pair.client is SpliceState.GONE:
            return
        if self.client.queue or self.server.queue:
            return  # flushed first, in order, by the relay itself
        self.fast_path = True
        self.counters.fast_path_installed += 1
        c, s = self.client, self.server
        if self.bounded:
            # The watch: the ACK of the last byte before the limit, while its
            # side still waits for it; the limit of the direction *into*
            # the other side (the entry keyed by this side's segments).
            c_watch = self._limit_ack(c) if self.pair.client is BOUNDED else None
            s_watch = self._limit_ack(s) if self.pair.server is BOUNDED else None
            out.append(
                InstallFastPath(
                    ((c.key, self.c2s, c_watch, s.stop), (s.key, self.s2c, s_watch, c.stop))
                )
            )
            return
        # A watch belongs to the side a FIN was relayed toward, while FIN_RELAYED.
        c_watch = c.fin_ack if self.pair.client is SpliceState.FIN_RELAYED else None
        s_watch = s.fin_ack if self.pair.server is SpliceState.FIN_RELAYED else None
        out.append(
            InstallFastPath(((c.key, self.c2s, c_watch, None), (s.key, self.s2c, s_watch, None)))
        )

    # ----------------------------------------------------------- states

    def _handle(self, iface: Iface, event: Event, out: list[Action], now: float) -> None:
        for tr in self.pair.handle(iface, event):
            if tr.starts_relaying and self.spliced:
                self._flush(tr.iface, out, now)
            if tr.enters_timewait and tr.iface is CLIENT:
                out.append(ArmTimewait(now + 2 * self.msl))
            if tr.torn_down and tr.iface is CLIENT:
                self.counters.torn_down += 1
                out.append(TearDown())
            if tr.hands_back and tr.iface is CLIENT:
                self._hand_back(out, now)

    def seal(self) -> bool:
        """Drop the buffers a splice whose both sides relay will never use again.

        Once both TCBs fell silent, nothing is queued toward either side
        (they are past PRE_SPLICED) and no proxy bytes are owed (len fully
        written, no early server bytes): the outboxes and queues are empty
        for good.  The I/O shell calls this when it compacts a splice;
        False (and nothing changed) if the splice is not there yet.
        """
        if self.bounded:
            return False  # its conns come back to the proxy
        sides = (self.client, self.server)
        for s in sides:
            if s is None or s.tcb is not None or s.queue or s.outbox:
                return False
        if self.len_remaining or self.early_s2c is not None:
            return False
        for s in sides:
            assert s is not None
            s.outbox = s.queue = _SEALED
        self.reclaimed = b""
        self.server_config = None  # ~200 B per idle splice, needed only to connect
        return True

    # ------------------------------------------------------------ stats

    def stats(self) -> dict[str, object]:
        def side(s: RelaySide | None) -> dict[str, object] | None:
            if s is None:
                return None
            tcb = s.tcb
            return {
                "draining": tcb is not None and self.spliced,
                "tcp_state": tcb.state.name if tcb is not None else None,
                "unacked": len(tcb.send_buf) if tcb is not None else 0,
                "outbox": sum(len(b) for b in s.outbox),
                "fin": [s.outbox_fin, s.fin_queued],
                "queued": len(s.queue),
            }

        return {
            "client_state": self.pair.client.name,
            "server_state": self.pair.server.name,
            "bytes_c2s": self.bytes_c2s,
            "bytes_s2c": self.bytes_s2c,
            "packets_c2s": self.packets_c2s,
            "packets_s2c": self.packets_s2c,
            "queued": len(self.client.queue) + (len(self.server.queue) if self.server else 0),
            "queue_drops": self.queue_drops,
            "len_remaining": self.len_remaining,
            "fast_path": self.fast_path,
            "bounded": self.bounded,
            "tapped": None if self.tap is None else self.tap.copied,
            "sides": {"client": side(self.client), "server": side(self.server)},
        }

    def draining(self, iface: Iface) -> bool:
        """Is this side's TCB still speaking (ESTABLISHED or PRE_SPLICED after splice())?"""
        return self.pair.state(iface) in QUEUEING_STATES


def _timestamp(pkt: memoryview, info: SegmentInfo) -> tuple[int, int] | None:
    """(TSval, TSecr) of a peeked segment, or None (no option, or no option space)."""
    if info.tcp_header_len <= 20:
        return None
    start = info.ip_header_len + 20
    return find_timestamp(pkt[start : info.ip_header_len + info.tcp_header_len])


def _timestamp_of(raw: bytes) -> int | None:
    """The TSval of a held segment (raw IPv4/TCP bytes)."""
    pkt = memoryview(raw)
    info = peek(pkt)
    ts = None if info is None else _timestamp(pkt, info)
    return None if ts is None else ts[0]
