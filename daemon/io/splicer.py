"""The splice relay's I/O side: intend_splice / splice, freezing, queues, relaying.

Theory of operation
-------------------
``intend_splice(client)`` (thesis 4.1) stops delivering the client's bytes
to the proxy: they stay in the client TCB, acknowledged, and will cross to
the server.  It reserves the server-side connection id and derives its TCP
options from the client connection (thesis 5.4): MSS = the client's MSS,
receive window scale = the client's own scale, timestamps and SACK offered.
``connect`` then opens it like any connection (splice state CLOSE ->
ESTABLISHED).

``splice(client, server, len)`` *freezes* both receive sides: from then on
segments arriving on either connection are not processed as data by the
TCBs.  What the TCBs had received crosses over as ordinary data: the client
TCB's unread bytes are sent by the server TCB, the server TCB's unread bytes
by the client TCB after the ``len`` bytes the proxy still writes (the SOCKS
reply).  Each TCB keeps receiving the *acknowledgment* part of incoming
segments (a zero-length copy at its own rcv_nxt) until everything it sent
is acknowledged; then it falls silent and its interface goes PRE_SPLICED ->
SPLICED, which fixes that side's base point (daemon/splice/session.py) and
flushes the segments queued toward it.  From then on a segment costs one
flow-table lookup, ``translate`` (a rewrite of the headers in the read
buffer) and one write.

Teardown follows Fig. 5.1 (daemon/splice/state.py): a relayed FIN and its
ACK give FIN_RELAYED then SHUTDOWN per interface, both SHUTDOWN give
TIMEWAIT, and 2MSL later the pair is forgotten, after which segments of
either connection get a RST from the daemon (RFC 9293 3.10.7.1).  A RST from
either side is relayed and tears the splice down at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon.api.core import ApiError, Done, Result
from daemon.api.protocol import Address, ErrorCode
from daemon.io.timers import Timer
from daemon.splice.session import TS_MARGIN, Side, SpliceSession
from daemon.splice.state import Event, Iface, SplicePair, SpliceState, Transition
from daemon.splice.translator import SegmentInfo, peek, translate
from daemon.tcp.config import TcpConfig
from daemon.tcp.events import TcpEvent
from daemon.tcp.seq import seq_ge
from daemon.tcp.state import TcpState
from daemon.wire.error import WireError
from daemon.wire.tcp import ACK, FIN, RST, SYN, TcpOptions, TcpSegment, parse_tcp
from daemon.wire.vnet import VnetHeader

if TYPE_CHECKING:
    from daemon.io.daemon import Conn, Daemon

log = logging.getLogger("daemon.splice")

MASK = 0xFFFFFFFF
QUEUE_LIMIT = 8 << 20  # bytes of segments held per splice while a side drains
CLIENT, SERVER = Iface.CLIENT, Iface.SERVER


@dataclass(eq=False)
class Splice:
    """One splice from intend_splice until it is forgotten."""

    client: Conn
    server_id: int
    server_config: TcpConfig
    owner: int
    pair: SplicePair = field(default_factory=SplicePair)
    server: Conn | None = None
    session: SpliceSession | None = None
    timewait: Timer = field(default_factory=Timer)
    spliced_at: float | None = None

    def conn(self, iface: Iface) -> Conn | None:
        return self.client if iface is CLIENT else self.server


class Splicer:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.intents: dict[int, Splice] = {}  # server-side conn id -> splice
        self.splices: set[Splice] = set()
        self.counters = {
            "spliced": 0,
            "relayed": 0,
            "queued": 0,
            "queue_drops": 0,
            "relay_malformed": 0,
            "resets_relayed": 0,
            "torn_down": 0,
            "timewait_reopened": 0,
        }

    # ----------------------------------------------------------- API ops

    def intend_splice(self, owner: int, conn_id: int) -> Result:
        c = self.d._conn(conn_id)
        if c.splice is not None:
            raise ApiError(ErrorCode.ESTATE, f"conn {conn_id} is already part of a splice")
        if c.tcp_gone or c.tcp.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            raise ApiError(ErrorCode.ESTATE, f"conn {conn_id} is not established")
        if c.listener is not None or c.connect_done is not None:
            raise ApiError(ErrorCode.ESTATE, f"conn {conn_id} is not a connection you accepted")
        t = c.tcp
        # Thesis 5.4: the server side is offered what the client negotiated,
        # so that segments can later pass between them unchanged: MSS clamp =
        # the client's MSS (5.4.4), receive scale = the client's own (5.4.2).
        cfg = dataclasses.replace(
            self.d.connect_config,
            mss=t.peer_mss,
            rcv_wscale=t.snd_wscale if t.wscale_ok else None,
            sack=True,
            timestamps=True,
        )
        sp = Splice(c, self.d._new_id(), cfg, owner)
        c.splice = sp
        c.hold_rx = True  # thesis 4.1: reading from the client stops here
        if c.pending is not None:
            # Taken out of the TCB but never delivered to the proxy: it belongs
            # to the server now, in front of what is still in the TCB.
            c.reclaimed = bytes(c.pending)
            c.pending = None
        self.intents[sp.server_id] = sp
        self.splices.add(sp)
        return {"conn": sp.server_id}

    def connect(
        self,
        owner: int,
        conn_id: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        done: Done,
    ) -> None:
        sp = self.intents.get(conn_id)
        if sp is None:
            done(ApiError(ErrorCode.ENOENT, f"no intended server connection {conn_id}"), None)
            return
        if sp.server is not None:
            done(ApiError(ErrorCode.ESTATE, f"conn {conn_id} is already connected"), None)
            return
        conn = self.d._open(owner, remote, local, timeout, done, sp.server_config)
        if conn is None:
            return
        conn.splice = sp
        conn.is_client = False
        conn.hold_rx = True  # thesis 4.1: the proxy never reads the server side
        conn.reserved_id = conn_id
        sp.server = conn

    def server_connected(self, conn: Conn) -> None:
        sp = conn.splice
        assert sp is not None
        self.intents.pop(sp.server_id, None)
        self._handle(sp, SERVER, Event.SERVER_CONNECTED)

    def connect_failed(self, conn: Conn) -> None:
        """The server side did not connect: the proxy may connect it again."""
        sp = conn.splice
        if sp is not None and sp.server is conn:
            sp.server = None

    def splice(
        self, owner: int, client_id: int, server_id: int, length: int, unread: bytes = b""
    ) -> Result:
        c = self.d._conn(client_id)
        sp = c.splice
        if sp is None or sp.client is not c:
            raise ApiError(ErrorCode.ESTATE, f"conn {client_id}: call intend_splice first")
        if sp.server_id != server_id:
            raise ApiError(ErrorCode.ESTATE, f"conn {server_id} is not {client_id}'s server side")
        s = sp.server
        if s is None or sp.pair.server is not SpliceState.ESTABLISHED:
            raise ApiError(ErrorCode.ESTATE, f"conn {server_id} is not connected yet")
        if sp.session is not None:
            raise ApiError(ErrorCode.ESTATE, "already spliced")
        if length < 0:
            raise ApiError(ErrorCode.EBADREQ, "len must be >= 0")
        if c.tcp_gone or s.tcp_gone:
            raise ApiError(ErrorCode.ECONNRESET, "a connection of the pair is gone")
        now = time.monotonic()
        # What the proxy wrote before calling splice is already in the
        # socketpairs: it goes out ahead of everything else.
        self.d._drain_proxy(c)
        self.d._drain_proxy(s)
        ct, st = c.tcp, s.tcp
        # Bytes each TCB received but nobody read cross to the other side.
        # In stream order: what sat unread in the proxy's fd, what the daemon
        # had taken out of the TCB for the fd, what is still in the TCB.
        r_c = unread + c.reclaimed + (ct.recv(ct.readable()) if ct.readable() else b"")
        r_s = st.recv(st.readable()) if st.readable() else b""
        c.reclaimed = b""
        session = SpliceSession(_side(ct, now), _side(st, now), self.d.offload)
        sp.session = session
        sp.spliced_at = now
        s.outbox.append(r_c) if r_c else None
        s.outbox_fin = c.peer_fin  # the client's FIN, if it came before the splice
        c.len_remaining = length
        c.rs_pending = r_s
        c.rs_fin = s.peer_fin
        for conn in (c, s):
            conn.frozen = True
        self._handle(sp, CLIENT, Event.SPLICE)
        self._handle(sp, SERVER, Event.SPLICE)
        self.counters["spliced"] += 1
        self._client_progress(c)
        self.d.dirty.add(c)
        self.d.dirty.add(s)
        return {"client": client_id, "server": server_id, "len": length}

    def client_gone(self, owner: int) -> None:
        """Unspliced intents die with their proxy; spliced pairs keep flowing."""
        for sp in list(self.splices):
            if sp.owner == owner and sp.session is None:
                self.intents.pop(sp.server_id, None)
                self.splices.discard(sp)
                if sp.server is not None:
                    sp.server.splice = None
                sp.client.splice = None

    def conn_freed(self, conn: Conn) -> None:
        """A connection of an intent (not spliced yet) is gone: so is the intent."""
        sp = conn.splice
        conn.splice = None
        if sp is None or sp.session is not None:
            return
        if conn is sp.server:
            sp.server = None  # the proxy may still connect the intent again
            return
        self.intents.pop(sp.server_id, None)
        self.splices.discard(sp)
        if sp.server is not None:
            sp.server.splice = None
            if not sp.server.tcp_gone:
                self.d._close_conn(sp.server)

    def stats(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for sp in self.splices:
            ses = sp.session
            out.append(
                {
                    "client": sp.client.api_id,
                    "server": sp.server_id,
                    "client_state": sp.pair.client.name,
                    "server_state": sp.pair.server.name,
                    "bytes_c2s": ses.bytes_c2s if ses else 0,
                    "bytes_s2c": ses.bytes_s2c if ses else 0,
                    "packets_c2s": ses.packets_c2s if ses else 0,
                    "packets_s2c": ses.packets_s2c if ses else 0,
                    "queued": len(ses.to_client) + len(ses.to_server) if ses else 0,
                    "queue_drops": ses.queue_drops if ses else 0,
                    "sides": {
                        name: _side_debug(conn)
                        for name, conn in (("client", sp.client), ("server", sp.server))
                        if conn is not None
                    },
                }
            )
        return out

    # ------------------------------------------------------ proxy bytes

    def proxy_data(self, conn: Conn, data: bytes) -> None:
        """Bytes the proxy wrote to a frozen connection's fd (thesis 4.1 rules)."""
        if conn.is_client and conn.len_remaining > 0:
            take = data[: conn.len_remaining]
            conn.outbox.append(take)
            conn.len_remaining -= len(take)
            data = data[len(take) :]
            self._client_progress(conn)
        if data:
            # Thesis 4.1: writing more than len to the client, or anything to
            # the server, after splice is not allowed.  Never relay it.
            conn.proxy_discarded += len(data)
            if not conn.misuse_reported and conn.api_id is not None:
                conn.misuse_reported = True
                what = "more than len bytes to the client" if conn.is_client else "to the server"
                self.d.api.push_event(
                    conn.owner,
                    {
                        "event": "error",
                        "conn": conn.api_id,
                        "error": ErrorCode.ESTATE.value,
                        "message": f"wrote {what} after splice; the bytes were discarded",
                    },
                )

    def proxy_done(self, conn: Conn) -> None:
        """The proxy let go of a spliced fd: no more of its len bytes will come."""
        if conn.is_client and conn.len_remaining > 0:
            log.warning("proxy closed with %d of its announced bytes unwritten", conn.len_remaining)
            conn.len_remaining = 0
            self._client_progress(conn)
            self.d.dirty.add(conn)

    def _client_progress(self, c: Conn) -> None:
        """Once the proxy wrote its len bytes, the server's early bytes follow them."""
        if c.len_remaining == 0 and c.rs_pending is not None:
            if c.rs_pending:
                c.outbox.append(c.rs_pending)
            c.outbox_fin = c.outbox_fin or c.rs_fin
            c.rs_pending = None

    # --------------------------------------------------------- service

    def service(self, conn: Conn, now: float) -> None:
        """A frozen connection: feed its TCB from the outbox until it drains."""
        sp = conn.splice
        assert sp is not None and sp.session is not None
        tcp = conn.tcp
        if conn.silent:
            return
        while tcp.events:
            ev = tcp.events.popleft()
            if ev in (TcpEvent.TIMED_OUT, TcpEvent.RESET):
                # The TCB gave up on its peer before draining: the splice
                # cannot complete; reset both sides (thesis 5.1 RST rule).
                self._abort(sp, now)
                return
        self.d.feed_outbox(conn)
        if not conn.outbox and conn.outbox_fin and not conn.fin_queued:
            conn.fin_queued = True
            if tcp.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                tcp.shutdown_write()
        self.d._emit_output(conn, now)
        if self._drained(conn):
            self._fall_silent(sp, conn, now)
            return
        deadline = tcp.next_deadline()
        if deadline is None:
            conn.timer.cancel()
        else:
            self.d.timers.schedule(conn.timer, deadline, lambda: self.d._on_timer(conn))

    def _drained(self, conn: Conn) -> bool:
        tcp = conn.tcp
        if conn.outbox or (conn.outbox_fin and not conn.fin_queued):
            return False
        if conn.is_client and (conn.len_remaining > 0 or conn.rs_pending is not None):
            return False
        return len(tcp.send_buf) == 0 and tcp.snd_una == tcp.snd_max

    def _fall_silent(self, sp: Splice, conn: Conn, now: float) -> None:
        """Thesis 5.1 PRE_SPLICED -> SPLICED: this TCB is done; relay toward its peer."""
        ses = sp.session
        assert ses is not None
        conn.silent = True
        conn.timer.cancel()
        iface = CLIENT if conn.is_client else SERVER
        side = ses.client if conn.is_client else ses.server
        side.iss = conn.tcp.snd_max
        side.snd_mss = conn.tcp.snd_mss
        ses.rebuild()
        self._handle(sp, iface, Event.WRITE_QUEUE_DRAINED)
        if conn.fin_queued:
            # The FIN of this direction was sent by the TCB itself (it came
            # before the splice) and is acknowledged: already relayed and
            # acked in Fig. 5.1's terms.
            self._handle(sp, iface, Event.FIN_RELAYED)
            self._handle(sp, iface, Event.FIN_ACKED)

    # ---------------------------------------------------------- packets

    def on_packet(self, conn: Conn, vnet: VnetHeader | None, pkt: memoryview, now: float) -> bool:
        """A segment arrived on a frozen connection: feed, relay or queue it.

        Returns False when the segment is not the splice's after all: a new
        SYN on a 4-tuple whose splice waits in TIMEWAIT ends that wait (as a
        TCP in TIME-WAIT may accept a new SYN, RFC 9293 3.10.7.4 / RFC 6191)
        and the caller handles it as a new connection.  Clients that closed
        passively reuse their port at once; without this their SYN would be
        relayed into the dead pair.
        """
        sp = conn.splice
        assert sp is not None and sp.session is not None
        info = peek(pkt)
        if info is None:
            self.counters["relay_malformed"] += 1
            return True
        if info.flags & (SYN | ACK) == SYN and sp.pair.client is SpliceState.TIMEWAIT:
            self.counters["timewait_reopened"] += 1
            self._handle(sp, CLIENT, Event.TIMEWAIT_EXPIRED)
            return False
        src = CLIENT if conn.is_client else SERVER
        dst = SERVER if conn.is_client else CLIENT
        pair = sp.pair
        if info.flags & RST:
            self._relay_reset(sp, src, vnet, pkt, info, now)
            return True
        ses = sp.session
        # Does this segment acknowledge the FIN we relayed toward its sender?
        fin_ack = ses.fin_ack_client if src is CLIENT else ses.fin_ack_server
        if (
            fin_ack is not None
            and info.flags & ACK
            and pair.state(src) is SpliceState.FIN_RELAYED
            and seq_ge(info.ack, fin_ack)
        ):
            self._handle(sp, src, Event.FIN_ACKED)
            if sp.pair.client is SpliceState.GONE:
                return True
        if not conn.silent and info.flags & ACK:
            self._feed_ack(conn, pkt, info, now)
        if pair.relays_toward(dst):
            self._relay(sp, src, vnet, pkt, info)
        else:
            self._queue(sp, dst, vnet, pkt)
        return True

    def _feed_ack(self, conn: Conn, pkt: memoryview, info: SegmentInfo, now: float) -> None:
        """Give the TCB the acknowledgment of a segment, never its data or FIN."""
        ip = pkt[: info.ip_header_len]
        try:
            seg = parse_tcp(
                pkt[info.ip_header_len :], bytes(ip[12:16]), bytes(ip[16:20]), verify_checksum=False
            )
        except WireError:
            return
        tcp = conn.tcp
        ack_only = TcpSegment(
            seg.src_port,
            seg.dst_port,
            tcp.rcv_nxt,
            seg.ack,
            ACK,
            seg.window,
            TcpOptions(timestamp=seg.options.timestamp),
            b"",
        )
        tcp.on_segment(ack_only, now)
        self.d.dirty.add(conn)

    def _relay(
        self, sp: Splice, src: Iface, vnet: VnetHeader | None, pkt: memoryview, info: SegmentInfo
    ) -> None:
        ses = sp.session
        assert ses is not None
        t = ses.c2s if src is CLIENT else ses.s2c
        assert t is not None
        outs = translate(t, vnet, pkt)
        if not outs:
            self.counters["relay_malformed"] += 1
            return
        write = self.d.tun.write
        for hdr, buf in outs:
            try:
                write(hdr, buf)
            except BlockingIOError:
                self.d.counters["tun_write_drops"] += 1
        self.counters["relayed"] += 1
        if src is CLIENT:
            ses.bytes_c2s += info.payload_len
            ses.packets_c2s += 1
        else:
            ses.bytes_s2c += info.payload_len
            ses.packets_s2c += 1
        if info.flags & FIN:
            dst = SERVER if src is CLIENT else CLIENT
            if sp.pair.state(dst) is SpliceState.SPLICED:
                end = (info.seq + t.seq_delta + info.payload_len + 1) & MASK
                if dst is SERVER:
                    ses.fin_ack_server = end
                else:
                    ses.fin_ack_client = end
                self._handle(sp, dst, Event.FIN_RELAYED)

    def _queue(self, sp: Splice, dst: Iface, vnet: VnetHeader | None, pkt: memoryview) -> None:
        ses = sp.session
        assert ses is not None
        if ses.queued_bytes + len(pkt) > QUEUE_LIMIT:
            # Like a drop on a congested link: the sender retransmits.
            ses.queue_drops += 1
            self.counters["queue_drops"] += 1
            return
        q = ses.to_server if dst is SERVER else ses.to_client
        q.append((None if vnet is None else vnet.to_bytes(), bytes(pkt)))
        ses.queued_bytes += len(pkt)
        self.counters["queued"] += 1

    def _flush(self, sp: Splice, dst: Iface) -> None:
        """Thesis 5.1: the queue toward an interface is relayed once it splices."""
        ses = sp.session
        assert ses is not None
        q = ses.to_server if dst is SERVER else ses.to_client
        src = CLIENT if dst is SERVER else SERVER
        while q and sp.pair.relays_toward(dst):
            hdr, raw = q.popleft()
            ses.queued_bytes -= len(raw)
            buf = memoryview(bytearray(raw))
            info = peek(buf)
            if info is None:
                continue
            vnet = VnetHeader.parse(hdr) if hdr is not None else None
            if info.flags & RST:
                self._relay_reset(sp, src, vnet, buf, info, time.monotonic())
                return
            self._relay(sp, src, vnet, buf, info)

    def _relay_reset(
        self,
        sp: Splice,
        src: Iface,
        vnet: VnetHeader | None,
        pkt: memoryview,
        info: SegmentInfo,
        now: float,
    ) -> None:
        """Thesis 5.1: a RST is relayed and tears the splice down."""
        ses = sp.session
        assert ses is not None
        dst = SERVER if src is CLIENT else CLIENT
        t = ses.c2s if src is CLIENT else ses.s2c
        other = sp.conn(dst)
        if t is not None:
            for hdr, buf in translate(t, vnet, pkt):
                self.d.tun.write(hdr, buf)
        elif other is not None and not other.tcp_gone:
            # That direction is not spliced yet: its own TCB still speaks for
            # it and resets the peer with its own sequence numbers.
            other.tcp.abort()
            self.d._emit_output(other, now)
        self.counters["resets_relayed"] += 1
        self._handle(sp, src, Event.RESET)

    def _abort(self, sp: Splice, now: float) -> None:
        for iface in (CLIENT, SERVER):
            conn = sp.conn(iface)
            if conn is not None and not conn.tcp_gone:
                conn.tcp.abort()
                self.d._emit_output(conn, now)
        if sp.pair.client is not SpliceState.GONE:
            self._handle(sp, CLIENT, Event.RESET)

    def on_timer(self, conn: Conn) -> None:
        """A frozen TCB's timer (retransmission while it drains)."""
        self.d.dirty.add(conn)

    # ----------------------------------------------------------- states

    def _handle(self, sp: Splice, iface: Iface, event: Event) -> None:
        for tr in sp.pair.handle(iface, event):
            self._on_transition(sp, tr)

    def _on_transition(self, sp: Splice, tr: Transition) -> None:
        log.debug("splice %s: %s %s -> %s", sp.server_id, tr.iface.value, tr.old.name, tr.new.name)
        if tr.starts_relaying and sp.session is not None:
            self._flush(sp, tr.iface)
        if tr.enters_timewait and tr.iface is CLIENT:
            msl = self.d.tcp_config.msl
            self.d.timers.schedule(
                sp.timewait, time.monotonic() + 2 * msl, lambda: self._timewait_over(sp)
            )
        if tr.torn_down and tr.iface is CLIENT:
            self._tear_down(sp)

    def _timewait_over(self, sp: Splice) -> None:
        if sp.pair.client is SpliceState.TIMEWAIT:
            self._handle(sp, CLIENT, Event.TIMEWAIT_EXPIRED)

    def _tear_down(self, sp: Splice) -> None:
        """Forget the pair: later segments of either connection get a RST."""
        sp.timewait.cancel()
        self.splices.discard(sp)
        self.intents.pop(sp.server_id, None)
        self.counters["torn_down"] += 1
        for conn in (sp.client, sp.server):
            if conn is not None:
                conn.splice = None
                self.d._free(conn)


def _side_debug(conn: Conn) -> dict[str, object]:
    """What a stuck splice needs looked at: is this side's TCB drained?"""
    t = conn.tcp
    return {
        "tcp_state": t.state.name,
        "silent": conn.silent,
        "frozen": conn.frozen,
        "unacked": len(t.send_buf),
        "snd_una": t.snd_una,
        "snd_max": t.snd_max,
        "outbox": sum(len(b) for b in conn.outbox),
        "len_remaining": conn.len_remaining,
        "rs_pending": None if conn.rs_pending is None else len(conn.rs_pending),
        "fin": [conn.outbox_fin, conn.fin_queued],
    }


def _side(tcp: object, now: float) -> Side:
    from daemon.tcp.connection import TcpConnection

    assert isinstance(tcp, TcpConnection)
    ts_clock = (int(now * 1000) + tcp.ts_offset) & MASK
    return Side(
        local=tcp.local,
        remote=tcp.remote,
        irs=tcp.rcv_nxt,
        ts_ok=tcp.ts_ok,
        ts_recv=tcp.ts_recent,
        ts_sent=(ts_clock + TS_MARGIN) & MASK,
        sack_ok=tcp.sack_ok,
        wscale_ok=tcp.wscale_ok,
        peer_wscale=tcp.snd_wscale,
        our_wscale=tcp.rcv_wscale,
        snd_mss=tcp.snd_mss,
    )


__all__ = ["Splice", "Splicer"]
