"""One splice: the base points of thesis 5.3/5.4 and the translators made from them.

Theory of operation
-------------------
The daemon is the TCP endpoint of both connections until ``splice()``;
afterwards it relays packets.  Each TCB finishes what it alone can finish
(its unacknowledged bytes: the proxy's reply, data that crossed before the
splice) and then falls silent; from then on the *sequence spaces* of the two
connections are glued with constant offsets::

  client conn   ... client TCB data ][ relayed server data ...
                                     ^ iss_c: client TCB's snd_max when it fell silent
  server conn   ... server TCB rcv  ][ server data ...
                                     ^ irs_s: server TCB's rcv_nxt when splice() froze it

  S->C:  seq_out = seq_in - irs_s + iss_c        ack_out = ack_in - iss_s + irs_c
  C->S:  seq_out = seq_in - irs_c + iss_s        ack_out = ack_in - iss_c + irs_s

``irs_*`` are fixed when splice() freezes the receive sides (from then on
the TCBs see only the ACK information of incoming segments, never their
data); ``iss_*`` when each TCB's write queue is empty (thesis 5.1:
PRE_SPLICED -> SPLICED).  A direction whose reverse is not yet spliced
acknowledges the constant ``irs`` of its output TCB (everything that TCB
received), which is exactly what that TCB itself was acknowledging.

Timestamps (5.4.1) are glued the same way with the TS clock of each TCB,
taken at splice() and pushed ``TS_MARGIN`` ahead; the TCB's own clock stops
just short of there (``TcpConnection.ts_cap``), so no TSval it still sends
during PRE_SPLICED can exceed a mapped one (the peer's PAWS check would
drop it).
Windows (5.4.2): the server side was offered the client's own scale, so
client windows pass unchanged when the server accepted scaling, and are
unscaled (and clamped at 65535) when it did not; server windows are
rescaled from the server's shift to the one the daemon offered the client
(rounded down: never more than the server allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.splice.family import V6_PLACEHOLDER
from daemon.splice.translator import Translator, TsMode
from daemon.tcp.config import Endpoint
from daemon.tcp.connection import TcpConnection
from daemon.wire.flowlabel import flow_label

MASK = 0xFFFFFFFF
# How far ahead of a TCB's TS clock the relayed TSvals start (ms ticks). The
# TCB's own clock stops one tick short of them (its ``ts_cap``), so its
# PRE_SPLICED segments stay older than the relayed ones whatever the margin;
# the margin is how long that clock may still run, which a taken-over kernel
# socket needed: its own retransmissions carry the kernel's clock, and a TCB
# segment older than those the client's PAWS drops (stopped at the splice
# instant, 1 in 50 mid-transfer hand-overs stalled while the socket lived on
# until the proxy closed it; since repair.close_silently disconnects it right
# after the read, only what it sent in between remains). It
# must stay well under 2 MSL: once a splice is forgotten its 4-tuple is free
# again, and a new connection on it starts from the host's own clock, which a
# peer still in TIME-WAIT compares with the last, relayed, TSval it saw (RFC
# 6191, PAWS). With 60 s it answered such SYNs with an ACK, the proxy host
# with a RST, and the SYN went again a second later.
TS_MARGIN = 1_000


@dataclass(slots=True)
class Side:
    """What the splice needs to know of one connection (frozen at splice())."""

    local: Endpoint
    remote: Endpoint
    irs: int = 0  # rcv_nxt of this side's TCB when splice() froze it
    iss: int | None = None  # snd_max of this side's TCB once its write queue drained
    ts_ok: bool = False
    ts_recv: int = 0  # the latest TSval received from this side's peer
    ts_sent: int = 0  # this side's TS clock at splice(), plus TS_MARGIN
    sack_ok: bool = False
    wscale_ok: bool = False
    peer_wscale: int = 0  # the shift the peer scales its window fields by
    our_wscale: int = 0  # the shift the peer applies to *our* window fields
    snd_mss: int = 536  # the largest payload this side's peer accepts
    ecn_ok: bool = False  # this side's handshake negotiated ECN (RFC 3168 6.1.1)
    flow_label: int | None = None  # its TCB's own IPv6 label, if it has one (not our hash)

    @classmethod
    def of(cls, tcb: TcpConnection, now: float) -> Side:
        """The base points of ``tcb`` as splice() freezes it (iss comes when it drains)."""
        return cls(
            local=tcb.local,
            remote=tcb.remote,
            irs=tcb.rcv_nxt,
            ts_ok=tcb.ts_ok,
            ts_recv=tcb.ts_recent,
            ts_sent=(tcb.ts_now(now) + TS_MARGIN) & MASK,
            sack_ok=tcb.sack_ok,
            wscale_ok=tcb.wscale_ok,
            peer_wscale=tcb.snd_wscale,
            our_wscale=tcb.rcv_wscale,
            snd_mss=tcb.snd_mss,
            ecn_ok=tcb.ecn_ok,
            flow_label=tcb.flow_label,
        )


def translators(
    client: Side, server: Side, offload: bool
) -> tuple[Translator | None, Translator | None]:
    """The (client -> server, server -> client) translators from the base points known so far.

    A direction exists once its *destination* side has fallen silent (its
    iss is fixed); until the reverse direction exists too, its ACK field is
    the constant ``irs`` of its output TCB (see the module docstring).
    """
    c2s = _translator(client, server, offload) if server.iss is not None else None
    s2c = _translator(server, client, offload) if client.iss is not None else None
    return c2s, s2c


def _translator(src: Side, dst: Side, offload: bool) -> Translator:
    """Segments from src's peer, out through dst's connection to dst's peer."""
    assert dst.iss is not None
    seq_delta = (dst.iss - src.irs) & MASK
    if src.iss is not None:
        ack_delta: int | None = (dst.irs - src.iss) & MASK
    else:
        ack_delta = None
    if src.ts_ok and dst.ts_ok:
        ts_mode = TsMode.MAP
    elif src.ts_ok:
        ts_mode = TsMode.STRIP
    else:
        ts_mode = TsMode.ABSENT
    # A window field from src's peer means field << in_shift bytes; dst's
    # peer reads our fields as field << out_shift, where out_shift is what we
    # offered it (5.4.2): the client's own shift to the server, so client
    # windows pass unchanged to a server that accepted scaling; the daemon's
    # own shift to the client, so server windows are rescaled unless the two
    # happen to agree.  The translator rounds down and clamps.
    in_shift = src.peer_wscale if src.wscale_ok else 0
    out_shift = dst.our_wscale if dst.wscale_ok else 0
    # An IPv6 connection's packets are IPv4-shaped inside the relay and get
    # their real addresses back on the way out (daemon/splice/family.py).
    six = len(dst.local[0]) == 16
    return Translator(
        src_addr=V6_PLACEHOLDER if six else dst.local[0],
        dst_addr=V6_PLACEHOLDER if six else dst.remote[0],
        src_port=dst.local[1],
        dst_port=dst.remote[1],
        seq_delta=seq_delta,
        ack_delta=ack_delta,
        ack_fixed=dst.irs,
        ts_mode=ts_mode,
        tsval_delta=(dst.ts_sent - src.ts_recv) & MASK,
        tsecr_delta=(dst.ts_recv - src.ts_sent) & MASK,
        sack=src.sack_ok and dst.sack_ok and ack_delta is not None,
        wnd_in_shift=in_shift,
        wnd_out_shift=out_shift,
        out_mss=dst.snd_mss,
        offload=offload,
        tsecr_floor_in=src.ts_sent,
        tsecr_floor_out=dst.ts_recv,
        # RFC 3168 across the splice: the marks mean something on the other
        # connection only if it negotiated ECN too (see the translator).
        ecn=src.ecn_ok and dst.ecn_ok,
        flow_label=(
            (flow_label(*dst.local, *dst.remote) if dst.flow_label is None else dst.flow_label)
            if six
            else 0
        ),
    )
